#!/bin/sh
# The bypass4netns seccomp profile on stdout, for the original workflow:
#   ./test/seccomp.json.sh > $HOME/seccomp.json
# A thin wrapper over seccomp-gen.py (one directory up), which does the work
# and takes the same options (see ./test/seccomp.json.sh --help).
set -eu
exec python3 "$(dirname -- "$0")/../seccomp-gen.py" "$@"
