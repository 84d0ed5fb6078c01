#!/usr/bin/env bash
# The whole CPU-scale reproduction of the paper's claims (results/paper), as one resumable command.
#
#   bash scripts/repro_cpu.sh [--lanes 1|2] [--no-report] [--dry-run]
#
# Runs the eight experiment=repro_cpu/* sweeps (108 jobs, 1 thread each) in two lanes side by side
# on a 2-core machine (--lanes 1: one after another), then `halp remeasure runs/repro_cpu` with
# nothing beside it, then `halp report --paper runs/repro_cpu --out results/paper`.
# Why two lanes with barriers: a model's latency table and anchors are timed by its first job, so
# that job runs alone (the other lane waits for its record); the ablations pair with
# main_resnet20's HALP runs by seed and share its cache (dense models, table, anchors).
# Resume: rerun the same command. Finished jobs are skipped (their record exists), an interrupted
# one restarts, the re-timing skips runs it has already timed. Progress: runs/repro_cpu/lanes.log.
# Environment: HALP_RUN (default: halp-run), HALP (default: halp), both on PATH or full paths;
# HALP_REPRO_POLL: seconds between checks while a lane waits (default 20).
set -uo pipefail

LANES=2 REPORT=1 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --lanes) LANES=${2:?--lanes needs 1 or 2}; shift 2 ;;
    --no-report) REPORT=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "repro_cpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$LANES" in 1|2) ;; *) echo "repro_cpu.sh: --lanes must be 1 or 2, got '$LANES'" >&2; exit 2 ;; esac

RUN=${HALP_RUN:-halp-run}
HALP=${HALP:-halp}
R=runs/repro_cpu
export WANDB_MODE=${WANDB_MODE:-offline}
for exe in "$RUN" "$HALP"; do
  command -v "$exe" >/dev/null || { echo "repro_cpu.sh: '$exe' not found (activate the venv, or set HALP_RUN / HALP)" >&2; exit 2; }
done
[ "$DRY" = 1 ] || mkdir -p "$R"

log() { echo "$(date +%T) $*" | tee -a "$R/lanes.log"; }
run() {
  if [ "$DRY" = 1 ]; then echo "$RUN -m $*"; return 0; fi
  log "start $*"; "$RUN" -m "$@"; local rc=$?; log "end rc=$rc $*"; return 0
}
# wait until any of the given files exists (a later marker stands in when the awaited job failed)
waitfor() {
  [ "$DRY" = 1 ] && return 0
  while :; do for f in "$@"; do [ -e "$f" ] && return 0; done; sleep "${HALP_REPRO_POLL:-20}"; done
}
mark() { [ "$DRY" = 1 ] || touch "$1"; }

lane_a() {
  run experiment=repro_cpu/main_resnet20 method=halp,taylor,magnitude
  run experiment=repro_cpu/ablation_solver
  run experiment=repro_cpu/ablation_pricing
  run experiment=repro_cpu/ablation_steps
  mark "$R/.lane_a_r20"; waitfor "$R/.lane_b_r20"   # MobileNetV2's table is timed with lane B idle
  run experiment=repro_cpu/main_mobilenetv2 method=halp,taylor,magnitude
  mark "$R/.lane_a_done"
}
lane_b() {
  waitfor "$R/main_resnet20/halp-t0.3-s0/result.json" "$R/.lane_a_r20"  # ResNet-20's table and anchors exist
  run experiment=repro_cpu/main_resnet20 method=eagleeye
  run experiment=repro_cpu/ablation_saliency
  run experiment=repro_cpu/ablation_grouping
  run experiment=repro_cpu/ablation_flops
  mark "$R/.lane_b_r20"
  waitfor "$R/main_mobilenetv2/halp-t0.3-s0/result.json" "$R/.lane_a_done"
  run experiment=repro_cpu/main_mobilenetv2 method=eagleeye
}

[ "$DRY" = 1 ] || rm -f "$R/.lane_a_r20" "$R/.lane_b_r20" "$R/.lane_a_done"
[ "$DRY" = 1 ] || log "reproduction start ($LANES lane(s))"
if [ "$LANES" = 2 ] && [ "$DRY" = 0 ]; then
  lane_a > "$R/lane_a.log" 2>&1 &
  lane_b > "$R/lane_b.log" 2>&1 &
  wait
else
  (mark "$R/.lane_b_r20"; lane_a; lane_b) 2>&1 | { [ "$DRY" = 1 ] && cat || cat >> "$R/lane_a.log"; }
fi
if [ "$DRY" = 1 ]; then
  echo "$HALP remeasure $R"
  [ "$REPORT" = 1 ] && echo "$HALP report --paper $R --out results/paper"
  exit 0
fi
# a job folder without its record: the job failed (its run.log says why)
missing=$(find "$R" -mindepth 2 -maxdepth 2 -type d ! -path "$R/cache/*" ! -name '.*' |
          while read -r d; do [ -f "$d/result.json" ] || echo "$d"; done)
if [ -n "$missing" ]; then
  log "jobs without a record (see their run.log; rerun this command to retry): $(echo "$missing" | tr '\n' ' ')"
  exit 1
fi
log "all jobs done; re-timing with nothing beside it"
"$HALP" remeasure "$R" || { log "remeasure failed"; exit 1; }
if [ "$REPORT" = 1 ]; then
  "$HALP" report --paper "$R" --out results/paper || { log "report failed"; exit 1; }
fi
log "reproduction done"
