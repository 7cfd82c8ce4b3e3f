#!/usr/bin/env bash
# Render a report page headless and save a PNG, as a person would see it in a browser.
#   docs/screenshot.sh quickstart-report/index.html docs/report_quickstart.png [WIDTH] [HEIGHT]
# Needs Debian's chromium package (apt-get install chromium fonts-dejavu-core).
# --allow-file-access-from-files is not needed: the page inlines its figures.
set -euo pipefail
page=${1:?usage: docs/screenshot.sh PAGE.html OUT.png [WIDTH] [HEIGHT]}
out=${2:?usage: docs/screenshot.sh PAGE.html OUT.png [WIDTH] [HEIGHT]}
width=${3:-1280}
height=${4:-2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "screenshot.sh: no chromium found; install Debian's chromium package" >&2; exit 2; }
# --no-sandbox: root in a container has no user namespace for Chromium's sandbox.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --window-size="$width,$height" --screenshot="$(realpath -m "$out")" "file://$(realpath "$page")" 2>/dev/null
echo "wrote $out"
