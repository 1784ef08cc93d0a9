# storaged — two commands do everything on a fresh Debian machine:
#   make run    install what is missing, then start storaged on a demo pool under ./.storaged
#   make test   install what is missing, then run lint, types, layer contracts and the tests
#   make soak   the concurrency tier and the write buffer's model checker for an hour
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE_DIR ?= .storaged
# Debian packages the project and its tests use (pyfuse3 builds against libfuse3; the VM
# tier boots linux-image-amd64 with a busybox-static initramfs under qemu-system-x86 and
# validates libvirt XML with libvirt-clients' virt-xml-validate).
DEBS := libfuse3-dev pkg-config fuse3 qemu-utils qemu-block-extra libnbd-bin python3-libnbd fio liblz4-1 libisal2 \
	libiscsi-bin openssl systemd prometheus ceph-mon ceph-osd ceph-common python3-rados \
	qemu-system-x86 linux-image-amd64 busybox-static e2fsprogs libvirt-clients libxml2-utils
STAMP := $(VENV)/.installed

.PHONY: rados-binding run completion test soak lint typecheck contracts pytest system-deps venv bench-engine bench-nbd bench-snapshots bench-fuse bench-send bench-rebuild bench-rados bench-iscsi bench-restart bench-qos bench clean

system-deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# editable_mode=compat: the checkout goes on sys.path by a plain .pth line; the default
# mode's import hook costs every Python start (storagectl too) about 30 ms here.
$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(MAKE) rados-binding
	touch $(STAMP)

# librados' Python binding exists only for Debian's python3 (python3-rados). The venv sees
# that one module, not the rest of dist-packages: a directory holding only a link to it, on
# sys.path by a .pth line. (pool/rados/binding.py also finds it without this.)
rados-binding:
	@so=$$($(BIN)/python -c 'from pool.rados.binding import debian_binding as d; print(d() or "")'); \
	test -n "$$so" || { echo "python3-rados is not installed for this Python (apt-get install python3-rados)"; exit 1; }; \
	mkdir -p $(VENV)/rados-binding && ln -sf "$$so" $(VENV)/rados-binding/ && \
	echo "$(abspath $(VENV))/rados-binding" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/debian-rados.pth"
	$(BIN)/python -c 'import rados'

venv: system-deps $(STAMP)

# Shell completion for storagectl, where the user's shell finds it: bash-completion loads
# $(BASH_COMPLETION_DIR)/storagectl on first use; zsh needs $(ZSH_COMPLETION_DIR) in fpath.
XDG_DATA_HOME ?= $(HOME)/.local/share
BASH_COMPLETION_DIR ?= $(XDG_DATA_HOME)/bash-completion/completions
ZSH_COMPLETION_DIR ?= $(XDG_DATA_HOME)/zsh/site-functions
completion: venv
	mkdir -p $(BASH_COMPLETION_DIR) $(ZSH_COMPLETION_DIR)
	$(BIN)/storagectl completion bash > $(BASH_COMPLETION_DIR)/storagectl
	$(BIN)/storagectl completion zsh > $(ZSH_COMPLETION_DIR)/_storagectl

run: venv completion
	$(BIN)/storaged --state-dir $(STATE_DIR) --socket $(STATE_DIR)/control.sock --demo \
	  --fuse-mount $(STATE_DIR)/mnt

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

contracts: venv
	$(BIN)/lint-imports

# loadgroup: the VM tier's modules (tests/integration/test_vm_*) go to one worker, which runs the
# guests one after another (tests/conftest.py pytest_xdist_make_scheduler).
pytest: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

test: lint typecheck contracts pytest

# The soak: for STORAGED_SOAK_SECONDS (an hour by default), at once, the concurrency tier
# against the daemon (tests/integration/test_concurrency.py) and the write buffer's model checker
# (tests/property/test_write_concurrency.py), from STORAGED_SOAK_SEED (default: the time).
STORAGED_SOAK_SECONDS ?= 3600
STORAGED_SOAK_SEED ?= $(shell date +%s)
soak: venv
	STORAGED_SOAK_SECONDS=$(STORAGED_SOAK_SECONDS) STORAGED_SOAK_SEED=$(STORAGED_SOAK_SEED) \
	  $(BIN)/python -m pytest -q -n 2 -rP -p no:cacheprovider \
	  tests/integration/test_concurrency.py tests/property/test_write_concurrency.py -k "many_clients or model_checker"

# py-spy (the sampling profiler the benchmarks' profiles are taken with) is a benchmark
# tool, installed here only:  $(BIN)/py-spy record -f raw -o out.txt -- $(BIN)/python -m ...
bench-engine: venv
	@test -x $(BIN)/py-spy || $(BIN)/pip install -q py-spy
	$(BIN)/python -m benchmarks.engine $(BENCH_ARGS)

bench-snapshots: venv
	$(BIN)/python -m benchmarks.snapshots

bench-send: venv
	$(BIN)/python -m benchmarks.send $(BENCH_ARGS)

bench-rebuild: venv
	$(BIN)/python -m benchmarks.rebuild $(BENCH_ARGS)

# QoS: cost with no limits against BENCH_ARGS' --baseline (default main), limit accuracy,
# the weight ratio.
bench-qos: venv
	$(BIN)/python -m benchmarks.qos $(BENCH_ARGS)

# On throwaway one-node Ceph clusters: segment objects beside rados bench and raw librados
# (benchmarks.rados), then fio over NBD on a RADOS pool beside fio's rbd engine on an RBD
# image of the same cluster, in interleaved rounds (benchmarks.rbd; BENCH_ARGS: --rounds N).
bench-rados: venv
	$(BIN)/python -m benchmarks.rados
	$(BIN)/python -m benchmarks.rbd $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.radoscpu

bench-restart: venv
	$(BIN)/python -m benchmarks.restart $(BENCH_ARGS)

# Benchmark-only tools are installed here, not by `make test`.
BENCH_DEBS := qemu-utils
bench-nbd: venv
	@missing=""; for p in $(BENCH_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	$(BIN)/python -m benchmarks.nbd $(BENCH_ARGS)

# qemu-storage-daemon (the FUSE export it is measured against) comes with qemu-system-common.
BENCH_FUSE_DEBS := qemu-system-common
bench-fuse: venv
	@missing=""; for p in $(BENCH_FUSE_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	$(BIN)/python -m benchmarks.fuse $(BENCH_ARGS)

# tgtd (the target storaged is measured against) is installed here only.
BENCH_ISCSI_DEBS := tgt
bench-iscsi: venv
	@missing=""; for p in $(BENCH_ISCSI_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	$(BIN)/python -m benchmarks.iscsi $(BENCH_ARGS)

# Every benchmark that has an anchor (engine, nbd, iscsi, fuse), each in interleaved rounds
# with its anchor, as ONE table: benchmarks/results/latest.md and latest.json (not committed).
# BENCH_ARGS: --rounds N (default 3), --smoke (a short check), --only nbd,fuse.
bench: venv
	@missing=""; for p in $(BENCH_DEBS) $(BENCH_FUSE_DEBS) $(BENCH_ISCSI_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	$(BIN)/python -m benchmarks.all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(STATE_DIR) .pytest_cache .mypy_cache .ruff_cache .hypothesis
