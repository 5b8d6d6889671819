#!/usr/bin/env bash
# Regenerates proto/tally/v1/*.pb.go with pinned generator versions.
# Needs only Go and the module proxy (no protoc, no remote buf registry).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=v1.75.0
go run "github.com/bufbuild/buf/cmd/buf@${BUF_VERSION}" lint
go run "github.com/bufbuild/buf/cmd/buf@${BUF_VERSION}" generate
