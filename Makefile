# Test peers installed from Debian when missing: "command:package" pairs
# (mkfs.ext4 makes the small filesystem of the full-disk test),
# and Python modules for Debian's /usr/bin/python3 as "module:package"
# (checked with -I, so that our own dkim/ folder does not pass for dkimpy),
# PostgreSQL's server programs (Debian keeps them off PATH, in
# /usr/lib/postgresql/VERSION/bin; the tests make throwaway clusters),
# Perl modules as "module=package" (swaks speaks TLS through Net::SSLeay,
# which its package only recommends), and Postfix, the null client of the
# e2e tests, with the SASL plugins its client logs in with (libplain; its
# programs are in /usr/sbin, which a user's PATH may lack). Postfix is
# installed with the debconf answer "No configuration": no
# /etc/postfix/main.cf, no system mailer; a system Postfix that the
# install started all the same is stopped by its PID.
# promtool comes with Debian's prometheus package; its server is not used
# (where policy-rc.d allows services, the package may start it).
TEST_PEERS := curl:curl python3:python3 promtool:prometheus swaks:swaks msmtp:msmtp mkfs.ext4:e2fsprogs
TEST_PYTHON_MODULES := dkim:python3-dkim nacl:python3-nacl aiosmtpd:python3-aiosmtpd
TEST_PERL_MODULES := Net::SSLeay=libnet-ssleay-perl
POSTFIX_PID_FILE := /var/spool/postfix/pid/master.pid

.PHONY: test test-deps build demo

# test installs what the tests need, then vets and runs every test with
# the race detector.
test: test-deps
	go vet ./...
	go test -race -count=1 ./...
	@$(MAKE) --no-print-directory test-fuzz
	@$(MAKE) --no-print-directory test-deploy

test-deps:
	@missing=""; \
	for pair in $(TEST_PEERS); do \
		cmd="$${pair%%:*}"; \
		command -v "$$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$$cmd" ] || [ -x "/sbin/$$cmd" ] || missing="$$missing $${pair##*:}"; \
	done; \
	for pair in $(TEST_PYTHON_MODULES); do \
		/usr/bin/python3 -I -c "import $${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	for pair in $(TEST_PERL_MODULES); do \
		perl -M"$${pair%%=*}" -e 1 >/dev/null 2>&1 || missing="$$missing $${pair##*=}"; \
	done; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v postconf >/dev/null 2>&1 || [ -x /usr/sbin/postconf ] || missing="$$missing postfix"; \
	ls /usr/lib/*/sasl2/libplain.so >/dev/null 2>&1 || missing="$$missing libsasl2-modules"; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		postfix_pid() { p=$$(tr -d ' \n' 2>/dev/null <$(POSTFIX_PID_FILE)); [ -n "$$p" ] && [ -d /proc/$$p ] && echo "$$p"; true; }; \
		pf_before=$$(postfix_pid); \
		case " $$missing " in *" postfix "*) \
			echo "postfix postfix/main_mailer_type select No configuration" | $$sudo debconf-set-selections;; \
		esac; \
		echo "installing test peers:$$missing"; \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
		pf_after=$$(postfix_pid); \
		if [ -n "$$pf_after" ] && [ -z "$$pf_before" ]; then \
			echo "stopping the system Postfix the install started (pid $$pf_after)"; \
			$$sudo kill "$$pf_after"; \
		fi; \
	fi

# test-fuzz runs each fuzz target for a bounded number of executions past
# its seed corpus (testdata/fuzz/<Name> in the owning package); a failing
# input is written there, to be committed with its fix. The bound is a
# count, not a duration: with Go 1.26 a -fuzztime duration can end in a
# spurious "context deadline exceeded" (go.dev/issue/75804). Counts are
# sized to a few seconds each on 2 cores; new inputs are minimised for at
# most 2 s.
#
# `go test -fuzz` takes one target at a time and links a new test binary
# each time, so each package's binary is built once, instrumented for
# fuzzing (`go test -c -fuzz`), and run for each of its targets from the
# package's directory with the cache directory that `go test` would give it.
FUZZ_TARGETS := cmd/smarthost/internal/config:FuzzParseConfig:15000 cmd/smarthost/internal/config:FuzzParseSize:40000 \
	cmd/smarthost/internal/config:FuzzParseRate:5000 relay:FuzzSenderAllowed:100000 \
	relay:FuzzValidPath:80000 relay:FuzzHeader:60000 relay:FuzzReadNormalized:25000 \
	queue:FuzzDecodeMessage:150000 queue:FuzzCheckFile:50000 dkim:FuzzParseKey:100000

.PHONY: test-fuzz
test-fuzz:
	@set -e; bin=$$(mktemp -d); trap 'rm -rf "$$bin"' EXIT; \
	module=$$(go list -m); cache=$$(go env GOCACHE)/fuzz; \
	for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; rest=$${t#*:}; name=$${rest%%:*}; n=$${rest#*:}; \
		test=$$bin/$$(echo $$pkg | tr / _).test; \
		[ -x $$test ] || go test -c -fuzz . -o $$test ./$$pkg; \
		echo "fuzz $$pkg $$name ($$n executions)"; \
		(cd $$pkg && $$test -test.run '^$$' -test.fuzz "^$$name\$$" -test.fuzztime $${n}x \
			-test.fuzzminimizetime 2s -test.fuzzcachedir $$cache/$$module/$$pkg -test.timeout 10m); \
	done

# test-deploy checks deploy/, a Go module of its own: the Helm chart
# rendered by a pinned Helm and its manifests checked by a pinned
# kubeconform against the schemas in deploy/testdata/schemas, the sidecar
# example, promtool on the alert rules, and the Grafana dashboard. Both
# tools come through the Go module proxy with `go run pkg@version`; the
# first run on a machine builds Helm (about 3 minutes on 2 cores).
.PHONY: test-deploy
test-deploy: test-deps
	cd deploy && go vet ./... && go test -race -count=1 .

build:
	CGO_ENABLED=0 go build -trimpath -o bin/smarthost ./cmd/smarthost

demo:
	go run ./cmd/smarthost demo
