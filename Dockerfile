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
EXPOSE 587 465
ENTRYPOINT ["/usr/local/bin/smarthost"]
CMD ["serve", "-config", "/etc/smarthost/config.toml"]
