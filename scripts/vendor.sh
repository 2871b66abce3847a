#!/usr/bin/env bash
# Refresh the page's third-party JavaScript from npm at the pinned versions below.
# The files land in jarvis/static/vendor/ with their licences; nothing is built or bundled.
set -euo pipefail
cd "$(dirname "$0")/.."

MARKED=18.2.1
DOMPURIFY=3.4.18
HIGHLIGHT=11.12.0
KATEX=0.19.1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HIGHLIGHT" "katex@$KATEX" >/dev/null)
for archive in "$work"/*.tgz; do
  mkdir -p "$work/$(basename "$archive" .tgz)"
  tar -xzf "$archive" -C "$work/$(basename "$archive" .tgz)"
done

vendor=jarvis/static/vendor
rm -rf "$vendor" && mkdir -p "$vendor"
cp "$work/marked-$MARKED/package/lib/marked.esm.js" "$vendor/marked.esm.js"
cp "$work/marked-$MARKED/package/LICENSE" "$vendor/marked.LICENSE"
cp "$work/dompurify-$DOMPURIFY/package/dist/purify.es.mjs" "$vendor/purify.es.mjs"
cp "$work/dompurify-$DOMPURIFY/package/LICENSE" "$vendor/dompurify.LICENSE"
cp "$work/highlightjs-cdn-assets-$HIGHLIGHT/package/es/highlight.min.js" "$vendor/highlight.min.js"
cp "$work/highlightjs-cdn-assets-$HIGHLIGHT/package/styles/github.min.css" "$vendor/highlight-github.min.css"
cp "$work/highlightjs-cdn-assets-$HIGHLIGHT/package/styles/github-dark.min.css" "$vendor/highlight-github-dark.min.css"
cp "$work/highlightjs-cdn-assets-$HIGHLIGHT/package/LICENSE" "$vendor/highlight.js.LICENSE"
# KaTeX renders to MathML only (the browser draws it): no stylesheet or fonts needed, nothing inline.
cp "$work/katex-$KATEX/package/dist/katex.mjs" "$vendor/katex.mjs"
cp "$work/katex-$KATEX/package/LICENSE" "$vendor/katex.LICENSE"
cat > "$vendor/VERSIONS" <<VERSIONS
marked $MARKED
dompurify $DOMPURIFY
@highlightjs/cdn-assets $HIGHLIGHT
katex $KATEX
VERSIONS
echo "vendored into $vendor:" && ls -la "$vendor"
