# Sourced by scripts/k8s.sh and scripts/helm.sh (the Go-built tools of the test bed).

# find_go: prints the go command to use: $GO, else go on PATH, else /usr/local/go/bin/go;
# fails (through the caller's `die`) when there is none.
find_go() {
  if [ -n "${GO:-}" ]; then
    printf '%s\n' "$GO"
  elif command -v go >/dev/null 2>&1; then
    command -v go
  elif [ -x /usr/local/go/bin/go ]; then
    printf '%s\n' /usr/local/go/bin/go
  else
    die "no Go toolchain found (set GO=/path/to/go or put go on PATH); Go >= 1.24 is needed"
  fi
}
