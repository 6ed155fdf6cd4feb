# Device run of the studies (not part of the package): setup, a smoke check, then the studies
# under a wall budget; the study folder is packed into $OUT every minute and at the end.
cd "$(dirname "$0")/.."
bash .devcarry/setup_device.sh > $OUT/setup.log 2>&1 || { echo SETUP FAILED; tail -30 $OUT/setup.log; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import torch, transformers, peft, cvxpy, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
T0=$(date +%s)
[ -d .devcarry/exp ] && cp -r .devcarry/exp /tmp/exp
[ -n "$SKIP_SMOKE" ] || timeout 150 python3 /tmp/site/fedlora_cli.py study experiments/smoke.yaml -o /tmp/smoke --workers 2 > $OUT/smoke.log 2>&1 || { echo SMOKE FAILED; tail -40 $OUT/smoke.log; exit 1; }
echo "smoke study ok in $(( $(date +%s) - T0 )) s"
pack() { tar czf $OUT/exp.tgz.tmp -C /tmp exp 2>/dev/null && mv $OUT/exp.tgz.tmp $OUT/exp.tgz; }
(while sleep 45; do pack; done) &
PACKER=$!
timeout ${BUDGET:-400} python3 /tmp/site/fedlora_cli.py study ${STUDIES:-experiments/sampling.yaml experiments/rank.yaml experiments/sota.yaml} -o /tmp/exp --workers ${WORKERS:-14} > $OUT/study.log 2>&1
echo "study rc=$? after $(( $(date +%s) - T0 )) s"
pkill -f fedlora_cli.py; pkill -f multiprocessing; sleep 3
kill $PACKER; pack
ls /tmp/exp; find /tmp/exp -name result.json | wc -l
tr '\r' '\n' < $OUT/study.log | grep -v "it/s\|run/s\|s/run" | tail -30
