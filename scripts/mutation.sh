#!/usr/bin/env bash
# Mutation testing of one package (or one module) with the tests that should catch its bugs:
#   bash scripts/mutation.sh app/exports tests/test_exports.py [more test files...]
#   bash scripts/mutation.sh app/deliberation/budget.py tests/test_stage_requests.py
# mutmut 3 (the dev extras) mutates the package's code and runs those tests against each
# mutant, one mutant at a time (MUTATION_CHILDREN to change that). Score = killed /
# (killed + survived). It works in a scratch copy of the checkout, .mutation/<package>/
# (its state is in mutants/ there), so the checkout stays clean and packages can run side
# by side; each run starts afresh. To look at a survivor afterwards:
#   cd .mutation/app.exports && ../../.venv/bin/mutmut show <mutant name>
# VENV names another virtualenv than .venv. MUTANTS runs only the mutants it names (mutmut's
# names, `*` for any part: MUTANTS='app.labeling.deliveries.x_spool__*'), for a module whose
# whole run takes hours; the others count as not checked.
# mutmut makes no mutants of decorated functions (but @staticmethod, @classmethod): route
# handlers, @property, @asynccontextmanager are left as they are.
# The tests make their own database and Redis keys per pytest session, so each mutant's run
# (a process forked from mutmut's) has its own.
set -euo pipefail
cd "$(dirname "$0")/.."
package=${1:?usage: scripts/mutation.sh <package dir or module> <test file>...}
shift
[ $# -gt 0 ] || { echo "name the test files that cover $package" >&2; exit 2; }
[ -e "$package" ] || { echo "no package or module $package" >&2; exit 2; }
package=${package%/}
if [ -d "$package" ]; then only_mutate="$package/*"; else only_mutate=$package; fi
venv=${VENV:-$PWD/.venv}

scratch=.mutation/${package//\//.}
rm -rf "$scratch"
mkdir -p "$scratch"
# The checkout as it is now (tracked and new files, uncommitted edits included).
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$scratch"

# mutmut runs the tests inside mutants/, a copy of the source paths plus `also_copy`: the
# package's top-level directory is the source path, everything else at the top is copied.
top=${package%%/*}
others=$(cd "$scratch" && ls -A | grep -vx "$top")
{
  echo "[mutmut]"
  echo "source_paths = $top"
  echo "only_mutate = $only_mutate"
  echo "also_copy ="
  printf '    %s\n' $others
  echo "pytest_add_cli_args_test_selection ="
  printf '    %s\n' "$@"
  echo "pytest_add_cli_args ="
  printf '    %s\n' -p no:cacheprovider -m "not chaos and not embedded_llm"
} >"$scratch/setup.cfg"
# mutmut reads [tool.mutmut] from pyproject.toml before setup.cfg; the checkout has none.
! grep -q '^\[tool\.mutmut\]' "$scratch/pyproject.toml" || { echo "remove [tool.mutmut] from pyproject.toml" >&2; exit 2; }

cd "$scratch"
unset PYTHONPATH  # mutmut puts mutants/ first on the path; the original code must not be importable
read -ra only <<<"${MUTANTS:-}"
"$venv/bin/mutmut" run --max-children "${MUTATION_CHILDREN:-1}" ${only[@]+"${only[@]}"} >mutmut-run.log 2>&1 || {
  tail -40 mutmut-run.log >&2
  exit 1
}
"$venv/bin/mutmut" export-cicd-stats >/dev/null
"$venv/bin/python" - "$package" <<'EOF'
import json
import sys

stats = json.load(open("mutants/mutmut-cicd-stats.json"))
killed, survived = stats["killed"], stats["survived"]
others = {k: v for k, v in stats.items() if k not in ("killed", "survived", "total") and v}
print(f"{sys.argv[1]}: {stats['total']} mutants, {killed} killed, {survived} survived, other: {others or 'none'}")
print(f"score = killed / (killed + survived) = {killed / (killed + survived):.1%}")
EOF
"$venv/bin/mutmut" results | sed 's/^ *//' | sort
