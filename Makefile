# Test peers: "command:debian-package" pairs installed when missing.
TEST_PEERS := curl:curl

.PHONY: test test-deps build demo

# test installs what the tests need, then vets and runs every test with
# the race detector.
test: test-deps
	go vet ./...
	go test -race -count=1 ./...

test-deps:
	@missing=""; \
	for pair in $(TEST_PEERS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing test peers:$$missing"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

build:
	CGO_ENABLED=0 go build -trimpath -o bin/smarthost ./cmd/smarthost

demo:
	go run ./cmd/smarthost demo
