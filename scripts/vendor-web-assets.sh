#!/usr/bin/env bash
# Re-fetch the dashboard's vendored browser assets (committed under src/telemetra/web/static/vendor) from
# the npm registry, pinned by version and checked by SHA-256, so the copies in the repo can be verified
# or upgraded with one command. Users never run this: the files ship inside the Python package.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=src/telemetra/web/static/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() {  # name version sha256
  local url
  url=$(npm view "$1@$2" dist.tarball)
  curl -sSfL "$url" -o "$tmp/$1.tgz"
  echo "$3  $tmp/$1.tgz" | sha256sum -c --quiet
  mkdir -p "$tmp/$1" && tar xzf "$tmp/$1.tgz" -C "$tmp/$1"
}

fetch uplot 1.6.32 4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
cp "$tmp"/uplot/package/dist/{uPlot.esm.js,uPlot.min.css} "$tmp"/uplot/package/LICENSE "$dest/uplot/"

fetch swagger-ui-dist 5.35.0 1b8e891893404ea4c3558b6a87e2a3e494e7eedba41168c2ece5800a391a6ea6
cp "$tmp"/swagger-ui-dist/package/{swagger-ui-bundle.js,swagger-ui-bundle.js.LICENSE.txt,swagger-ui.css} \
   "$tmp"/swagger-ui-dist/package/{LICENSE,NOTICE,favicon-32x32.png} "$dest/swagger-ui/"
git status --short "$dest"
