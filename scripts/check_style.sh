#!/usr/bin/env bash
# Checks what a change touched against the style checked in (.clang-format, .clang-tidy):
#   clang-format on the changed lines of C++/CUDA files, clang-tidy on the changed .cpp files
#   (and the changed headers they include), using build/release/compile_commands.json.
# usage: scripts/check_style.sh [--fix] [BASE]
#   BASE defaults to the commit that checked the style in, so every line written since is held to it;
#   --fix rewrites the changed lines with clang-format instead of failing (clang-tidy findings stay errors).
set -euo pipefail
cd "$(dirname "$0")/.."

fix=0
if [[ ${1:-} == --fix ]]; then fix=1; shift; fi
base=${1:-$(git log --diff-filter=A --format=%H -- .clang-format | tail -n 1)}
if [[ -z "$base" ]] || ! git rev-parse -q --verify "$base^{commit}" >/dev/null; then
  echo "style: no base commit (.clang-format not in this clone's history): checking the last commit only"
  base=HEAD~1
fi
build=${MOEDIST_STYLE_BUILD:-build/release}
format_diff=$(command -v clang-format-diff-14 || command -v clang-format-diff || true)
[[ -n "$format_diff" ]] || { echo "style: clang-format-diff not found (Debian: apt-get install clang-format)" >&2; exit 2; }
command -v clang-tidy >/dev/null || { echo "style: clang-tidy not found (Debian: apt-get install clang-tidy)" >&2; exit 2; }

# Files of ours only: third-party or generated files would not be in these folders.
mapfile -t changed < <(git diff --name-only --diff-filter=AMR "$base" -- \
  'src/*.cpp' 'src/*.h' 'src/*.cu' 'include/*.h' 'tools/*.cpp' 'tools/*.h' 'bench/*.cpp' 'bench/*.h' \
  'tests/*.cpp' 'tests/*.h' 'python/src/*.cpp' 'python/src/*.h' 'fuzz/*.cpp' 'examples/*.cpp')
echo "style: ${#changed[@]} C++/CUDA files changed since $(git rev-parse --short "$base")"
((${#changed[@]} > 0)) || exit 0

status=0
if ((fix)); then
  git diff -U0 --no-color "$base" -- "${changed[@]}" | "$format_diff" -p1 -i
else
  formatting=$(git diff -U0 --no-color "$base" -- "${changed[@]}" | "$format_diff" -p1)
  if [[ -n "$formatting" ]]; then
    echo "$formatting"
    echo "style: FAILED: the changed lines above are not formatted as .clang-format says (scripts/check_style.sh --fix rewrites them)"
    status=1
  else
    echo "style: clang-format: the changed lines are formatted"
  fi
fi

[[ -f "$build/compile_commands.json" ]] || { echo "style: $build/compile_commands.json missing: configure the release preset first" >&2; exit 2; }
mapfile -t sources < <(printf '%s\n' "${changed[@]}" | grep -E '\.cpp$' | while read -r f; do
  grep -q "\"file\": \"$PWD/$f\"" "$build/compile_commands.json" && echo "$f"; done || true)
headers=$(printf '%s\n' "${changed[@]}" | grep -E '\.h$' | sed 's/[.]/[.]/g' | paste -sd'|' || true)
header_filter="^$PWD/(${headers:-no-changed-header})\$"
echo "style: clang-tidy on ${#sources[@]} changed sources"
if ((${#sources[@]} > 0)); then
  if ! printf '%s\n' "${sources[@]}" | xargs -P "$(nproc)" -n 1 clang-tidy -p "$build" --quiet --extra-arg=-Wno-everything --header-filter="$header_filter" \
      > /tmp/moedist-clang-tidy.$$ 2>&1; then
    grep -E -A3 'error:|warning:' /tmp/moedist-clang-tidy.$$ | grep -v 'warnings generated' || cat /tmp/moedist-clang-tidy.$$
    echo "style: FAILED: clang-tidy findings above (.clang-tidy says why each check is on)"
    status=1
  else
    echo "style: clang-tidy: no findings"
  fi
  rm -f /tmp/moedist-clang-tidy.$$
fi
exit $status
