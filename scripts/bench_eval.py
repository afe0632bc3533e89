"""Benchmark of `bema-offline eval`: wall time and peak RSS of whole processes, for 1 and for K model folders.

Models are evaluated one at a time, so the peak RSS should be one model plus activations whatever K; this measures it.
The models are random Llama-shaped folders (`--hidden`, `--layers`; fp32) with the demo's character tokenizer, the
data the demo's held-out text cut into `--rows` rows of `--length` characters. Each case runs as its own process from
this light launcher (no torch here), and its peak RSS is the kernel's count for that process.

    python scripts/bench_eval.py --models 4 --hidden 768 --layers 8     # builds under --root on first use
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(command: list[str]) -> tuple[float, int, float]:
    """Run a command; return (wall seconds, peak RSS in bytes, CPU seconds) of the child process."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{err.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


BUILD = """
import json, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from bema_offline.train.demo import VOCAB, _tokenizer_json, build_corpus
root, count, hidden, layers, rows, length = Path(sys.argv[1]), *map(int, sys.argv[2:7])
config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=2048,
                     tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
for index in range(count):
    torch.manual_seed(index)
    folder = root / "sweep" / f"model-{index}"
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>"}))
text = build_corpus().heldout_text * (1 + rows * length // len(build_corpus().heldout_text))
(root / "heldout.jsonl").write_text("".join(json.dumps({"text": text[i * length:(i + 1) * length]}) + "\\n" for i in range(rows)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/bema-bench-eval"))
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    shape = [args.models, args.hidden, args.layers, args.rows, args.length]
    stamp = args.root / "built.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != shape:
        shutil.rmtree(args.root, ignore_errors=True)
        args.root.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", BUILD, str(args.root), *map(str, shape)], check=True)
        stamp.write_text(json.dumps(shape))
    folders = sorted((args.root / "sweep").iterdir())
    size = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    print(f"{len(folders)} models of {size / 2**20:.0f} MiB (fp32, hidden {args.hidden}, {args.layers} layers); "
          f"{args.rows} rows of {args.length} tokens; batch size {args.batch_size}")
    print(f"{'models':>6} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}")
    command = [sys.executable, "-m", "bema_offline", "eval", "--data", str(args.root / "heldout.jsonl"), "--quiet",
               "--batch-size", str(args.batch_size), "-o", str(args.root / "report")]
    for models in ([folders[0]], folders):
        wall, rss, cpu = measure([*command[:4], *map(str, models), *command[4:]])
        print(f"{len(models):>6} {wall:>8.1f} {cpu:>8.1f} {rss / 2**20:>13.0f}")


if __name__ == "__main__":
    main()
