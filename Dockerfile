# Static binary on a distroless base, running as a non-root user.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/smarthost ./cmd/smarthost \
 && mkdir -p /out/queue

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/smarthost /usr/local/bin/smarthost
# The queue lives on a volume owned by the nonroot user (65532).
COPY --from=build --chown=65532:65532 /out/queue /var/lib/smarthost
VOLUME /var/lib/smarthost
USER 65532:65532
# A non-root user cannot bind ports under 1024: the listeners use the
# Helm chart's container ports (2587 for submission, 2465 for implicit
# TLS), which the Service maps to 587 and 465, and 9090 for [http].
EXPOSE 2587 2465 9090
ENTRYPOINT ["/usr/local/bin/smarthost"]
CMD ["serve", "-config", "/etc/smarthost/config.toml"]
