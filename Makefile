# flexnbd: build, test, benchmark and run a demo server.
GO        ?= go
PREFIX    ?= /usr/local
BIN       := bin/flexnbd
DEMO_IMG  ?= demo/demo.img
DEMO_SIZE ?= 1G
ADDR      ?= 127.0.0.1
PORT      ?= 10809
GOFILES   := $(shell find . -name '*.go' -not -path './.git/*')
# The version flexnbd --version and status report; empty without git, and
# the binary then falls back to what the Go toolchain recorded.
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null)
# Where make install puts things, under DESTDIR; see README "Install".
BINDIR      ?= $(PREFIX)/bin
MANDIR      ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/site-functions
SYSTEMDDIR  ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DOCDIR      ?= $(PREFIX)/share/doc/flexnbd
MANPAGES  := $(wildcard man/*.1)
UNITS     := $(wildcard contrib/systemd/*.service contrib/systemd/*.socket)
# make deb builds with nfpm at this version, outside go.mod so that the
# module does not depend on nfpm's dependencies.
NFPM      ?= $(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2
DEBDIR    ?= bin
# make deb's staging tree and binary, made afresh each time.
DEBBUILD  ?= build

.PHONY: all build test vet fmt-check race unit fuzz soak bench bench-migrate bench-proxy serve man install clean
.PHONY: uninstall deb FORCE
.PHONY: bench-scale

all: build

build: $(BIN)

# The version is a prerequisite through a stamp beside the binary, rewritten
# only when it differs: a new tag or VERSION=... rebuilds, an unchanged one
# does not.
$(BIN).version: FORCE
	@mkdir -p $(dir $@)
	@echo '$(VERSION)' | cmp -s - $@ || echo '$(VERSION)' > $@

$(BIN): $(GOFILES) go.mod go.sum $(BIN).version
	$(GO) build -ldflags "$(if $(VERSION),-X main.version=$(VERSION))" -o $(BIN) ./cmd/flexnbd

# The whole test suite: static checks, then every test under the race
# detector, real NBD clients (qemu, libnbd, fio) and the Linux kernel's own
# client included. .ci/run installs what it needs.
test: fmt-check vet build
	$(GO) test -race -count=1 -timeout 12m ./...
	$(GO) test -count=1 -run 'AllocatesNothing|InterleaveWithABurst' ./server/
	FUZZTIME=$${FUZZTIME:-15s} GO=$(GO) scripts/fuzz.sh

# Every fuzz target for FUZZTIME each (15 s by default); failing inputs are
# kept under the package's testdata/fuzz/.
fuzz:
	GO=$(GO) scripts/fuzz.sh

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $(GOFILES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Side-by-side fio benchmark against nbdkit, qemu-nbd and nbd-server on the
# same file; see docs/BENCHMARKS.md.
bench: build
	scripts/bench.sh

# Multi-connection scaling against nbdkit, qemu-nbd and nbd-server on
# 512 MiB in the page cache: 4 KiB random reads and writes on SCALE
# connections (1 2 4 8 16 64) at QD1 each, 4 connections at QD8 and one at
# QD32, then 8 busy connections at QD1 with and without IDLE (1000) idle
# ones; IOPS, p50/p99/p99.9 latency and server CPU per request. Takes about
# an hour with the defaults; see docs/BENCHMARKS.md.
bench-scale: build
	FLEXNBD_BENCH_SIZE=$${FLEXNBD_BENCH_SIZE:-512M} WORKLOADS="$${WORKLOADS:-scale idle}" GO=$(GO) \
		scripts/bench.sh

# The proxy against direct access to the same flexnbd serve, and nbdkit's
# nbd plugin as a proxy for reference; see docs/BENCHMARKS.md.
bench-proxy: build
	SERVERS="flexnbd flexnbd-proxy nbdkit-proxy" SUBJECT=flexnbd-proxy REFERENCE=flexnbd \
		WORKLOADS="$${WORKLOADS:-rr4k_qd32 rw4k_qd32 sr1m_qd8}" scripts/bench.sh

# Minutes of clients verifying what they read while the access list
# changes and migrations start, break and complete; see docs/BENCHMARKS.md.
soak: build
	$(GO) run ./internal/benchtools/soak -bin $(BIN) -duration $${DURATION:-2m} -clients $${CLIENTS:-64}

# Migration benchmark: flexnbd mirror against nbdcopy into nbdkit, sparse
# against dense exports, and the longest client write across a hand-off;
# see docs/BENCHMARKS.md.
bench-migrate: build
	GO=$(GO) scripts/bench-migrate.sh

# Build, create a sparse demo image if there is none, and serve it.
serve: build
	@mkdir -p $(dir $(DEMO_IMG))
	@[ -f $(DEMO_IMG) ] || truncate -s $(DEMO_SIZE) $(DEMO_IMG)
	@echo "Serving $(DEMO_IMG) on $(ADDR):$(PORT). Connect with, for example:"
	@echo "  nbdinfo nbd://$(ADDR):$(PORT)"
	@echo "  qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://$(ADDR):$(PORT)"
	@echo "  $(BIN) read --addr $(ADDR) --port $(PORT) --from 0 --size 1048576 | xxd | head"
	@echo "Stop with Ctrl-C."
	exec $(BIN) serve --addr $(ADDR) --port $(PORT) --file $(DEMO_IMG) --verbose

man:
	@for m in man/*.1; do man -l -Tutf8 $$m 2>/dev/null | col -b || groff -man -Tutf8 $$m; done

# The proxy is the same binary under the name flexnbd-proxy, as the C
# flexnbd ships it. Completions come from the binary itself; the systemd
# units get ExecStart's path fixed to BINDIR.
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/flexnbd
	ln -sf flexnbd $(DESTDIR)$(BINDIR)/flexnbd-proxy
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 0644 $(MANPAGES) $(DESTDIR)$(MANDIR)/man1/
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR)
	$(BIN) completion bash > $(DESTDIR)$(BASHCOMPDIR)/flexnbd
	ln -sf flexnbd $(DESTDIR)$(BASHCOMPDIR)/flexnbd-proxy
	$(BIN) completion zsh > $(DESTDIR)$(ZSHCOMPDIR)/_flexnbd
	chmod 0644 $(DESTDIR)$(BASHCOMPDIR)/flexnbd $(DESTDIR)$(ZSHCOMPDIR)/_flexnbd
	@set -e; for u in $(UNITS); do \
		install -d $(DESTDIR)$(SYSTEMDDIR); \
		echo "install $$u $(DESTDIR)$(SYSTEMDDIR)/"; \
		sed 's|/usr/bin/flexnbd|$(BINDIR)/flexnbd|g' $$u > $(DESTDIR)$(SYSTEMDDIR)/$${u##*/}; \
		chmod 0644 $(DESTDIR)$(SYSTEMDDIR)/$${u##*/}; \
	done
	install -D -m 0644 contrib/systemd/flexnbd.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/flexnbd.conf
	install -D -m 0644 contrib/systemd/example.conf $(DESTDIR)$(DOCDIR)/example.conf

# Removes exactly the files install put, with the same variables.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/flexnbd $(DESTDIR)$(BINDIR)/flexnbd-proxy
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(MANPAGES)))
	rm -f $(DESTDIR)$(BASHCOMPDIR)/flexnbd $(DESTDIR)$(BASHCOMPDIR)/flexnbd-proxy $(DESTDIR)$(ZSHCOMPDIR)/_flexnbd
	$(if $(UNITS),rm -f $(addprefix $(DESTDIR)$(SYSTEMDDIR)/,$(notdir $(UNITS))))
	rm -f $(DESTDIR)$(SYSUSERSDIR)/flexnbd.conf $(DESTDIR)$(DOCDIR)/example.conf
	-rmdir $(DESTDIR)$(DOCDIR) 2>/dev/null

# A Debian package of what install puts under PREFIX=/usr, the binary
# built without cgo so that it depends on no library; written to DEBDIR.
deb:
	rm -rf $(DEBBUILD)/deb $(DEBBUILD)/deb-bin $(DEBBUILD)/nfpm.yaml
	CGO_ENABLED=0 $(MAKE) install BIN=$(DEBBUILD)/deb-bin/flexnbd DESTDIR=$(abspath $(DEBBUILD))/deb PREFIX=/usr \
		ZSHCOMPDIR=/usr/share/zsh/vendor-completions VERSION='$(VERSION)'
	mkdir -p $(DEBDIR)
	sed 's|src: build/deb/|src: $(abspath $(DEBBUILD))/deb/|' packaging/nfpm.yaml > $(DEBBUILD)/nfpm.yaml
	DEB_VERSION=$$(scripts/deb-version '$(VERSION)') DEB_ARCH=$$($(GO) env GOARCH) \
		$(NFPM) package --config $(DEBBUILD)/nfpm.yaml --packager deb --target $(DEBDIR)/

clean:
	rm -rf bin build
