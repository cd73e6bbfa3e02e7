"""End to end: lawwatch's ``measure`` against the paper authors' pipeline as they run it.

    .venv/bin/python bench/bench_e2e.py [--repeat 2] [--shapes small,gpt2] [--batch-size 2]
                                        [--threads 2] [--tiny]

A GPT-2-small run (``--shapes gpt2 --repeat 1``) takes ~10 minutes on 2 loaded CPU cores.

Three pipelines on the same random GPT-2 and the same probe, each in its own child process
(so that its peak resident memory, ``ru_maxrss``, is its own):

- **forward** (the floor): the model's forward over the probe, batch by batch, no hooks, no
  hidden states kept, ``logits_to_keep=1``;
- **lawwatch**: ``lawwatch.measure(model, probe, batch_size=...)`` (hooks, float64 features,
  statistics accumulated batch by batch, one batched solve);
- **theirs**: the authors' pipeline, all features in memory: the base model's forward with
  ``output_hidden_states=True``; entries ``0 .. L-1`` through a freshly initialized LayerNorm of
  the model's type (weight 1, bias 0, the model's epsilon), the last entry as it is (the model's
  final norm already applied); every example's feature at every entry gathered into one
  ``(entries, n, d)`` float32 array; then per entry a scikit-learn ``LinearRegression`` fitted
  on the features cast to float64 (scikit-learn would otherwise fit in float32) and
  ``PR = 1 - score`` (``1 - R²``).

A fourth child builds the model and probe only: its peak RSS is the baseline subtracted from
the others'. Each child runs its pipeline ``--repeat`` times, after an untimed warm-up on the
probe's first two sequences, and reports the best wall time and the best CPU time (process
time, all threads: steadier than wall time on a shared machine). The probe is real text as
byte ids (``pydoc_data.topics``, which every CPython ships), in sequences of the shape's
length: examples are every position but the last of each sequence.

The results go to stdout as a Markdown table: wall time of each pipeline, the cost beyond the
forward of lawwatch and of theirs and their ratio, the peak RSS beyond the baseline of each,
and the largest absolute difference between the two pipelines' PRs.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

# name -> (blocks, width, heads, sequences, length, batch_size)
SHAPES = {
    "tiny": (4, 32, 4, 16, 64, 8),
    "small": (6, 256, 8, 32, 256, 8),
    "gpt2": (12, 768, 12, 32, 512, 8),  # GPT-2 small's shape; 16 352 examples
}
VOCAB = 50257  # GPT-2's (the tiny shape: 1024); the probe's byte ids are below 256


def build(shape):
    """The random GPT-2 and the probe (real text as byte ids), the same in every child."""
    from pydoc_data.topics import topics

    from lawwatch import ProbeSet

    n_layer, n_embd, n_head, rows, length, _ = SHAPES[shape]
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=1024 if shape == "tiny" else VOCAB,
        n_positions=max(length, 64),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    text = "\n".join(topics[k] for k in sorted(topics)).encode()
    ids = torch.tensor(list(text[: rows * length]), dtype=torch.long).view(rows, length)
    return model, ProbeSet.from_tokens(ids)


def forward(model, probe, batch_size):
    """The floor: the forward that any measurement needs, nothing kept."""
    with torch.no_grad():
        for ids, mask in probe.batches(batch_size):
            model(input_ids=ids, attention_mask=mask.long(), use_cache=False, logits_to_keep=1)


def lawwatch_prs(model, probe, batch_size):
    from lawwatch import measure

    return measure(model, probe, batch_size=batch_size).pr.tolist()


def their_prs(model, probe, batch_size):
    """The authors' pipeline: every feature in memory, then one sklearn fit per entry."""
    from sklearn.linear_model import LinearRegression

    final = model.transformer.ln_f
    fresh = type(final)(final.normalized_shape, eps=final.eps)  # weight 1, bias 0
    features, targets = [], []
    with torch.no_grad():
        for ids, mask in probe.batches(batch_size):
            out = model.transformer(
                input_ids=ids,
                attention_mask=mask.long(),
                output_hidden_states=True,
                use_cache=False,
            )
            states = out.hidden_states  # L + 1 of (batch, length, d); the last after ln_f
            normed = [fresh(h) for h in states[:-1]] + [states[-1]]
            keep = (mask[:, :-1] & mask[:, 1:]).bool()  # position j has a real j + 1
            features.append(torch.stack([h[:, :-1][keep] for h in normed]))  # (entries, m, d)
            targets.append(ids[:, 1:][keep])
    x = torch.cat(features, dim=1).numpy()  # (entries, n, d) float32: all of it, at once
    y = torch.cat(targets).numpy().astype(np.float64)  # (n,) the next token's id
    prs = []
    for entry in x:
        xe = entry.astype(np.float64)
        prs.append(1.0 - LinearRegression().fit(xe, y).score(xe, y))
    return prs


PIPELINES = {
    "baseline": None,
    "forward": forward,
    "lawwatch": lawwatch_prs,
    "theirs": their_prs,
}


def child(shape, pipeline, repeat, threads, batch_size):
    """Run one pipeline ``repeat`` times; print one JSON line: best seconds, peak RSS, PRs."""
    from lawwatch import ProbeSet

    torch.set_num_threads(threads)
    model, probe = build(shape)
    fn, times, cpus, prs = PIPELINES[pipeline], [], [], None
    if fn is not None:
        # warm-up on two sequences (first-call set-up of torch, MKL, sklearn), not timed
        fn(model, ProbeSet.from_tokens(probe.input_ids[:2]), batch_size)
        for _ in range(repeat):
            start, cpu = time.perf_counter(), time.process_time()
            prs = fn(model, probe, batch_size)
            times.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    result = {"seconds": min(times, default=0.0), "times": times, "peak_mb": peak}
    result["cpu"], result["cpus"] = min(cpus, default=0.0), cpus
    result["prs"], result["examples"] = prs, probe.num_examples()
    print(json.dumps(result))


def run_child(shape, pipeline, repeat, threads, batch_size):
    command = [sys.executable, __file__, "--child", shape, pipeline, str(repeat)]
    command += ["--threads", str(threads), "--batch-size", str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{pipeline} on {shape} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="small,gpt2", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--repeat", type=int, default=2, help="runs per pipeline; best taken")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, help="sequences per forward (default: shape's)")
    parser.add_argument("--tiny", action="store_true", help="a 4 x 32 model, once (tests)")
    parser.add_argument("--child", nargs=3, metavar=("SHAPE", "PIPELINE", "REPEAT"))
    args = parser.parse_args()
    if args.child:
        shape, pipeline, repeat = args.child
        child(shape, pipeline, int(repeat), args.threads, args.batch_size)
        return
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    repeat = 1 if args.tiny else args.repeat
    import sklearn

    print(
        f"nproc={os.cpu_count()} cpu={cpu_model()!r} torch={torch.__version__} "
        f"sklearn={sklearn.__version__} threads={args.threads} repeat={repeat} "
        f"load average at start={os.getloadavg()[0]:.2f}"
    )
    rows = []
    for shape in shapes:
        n_layer, n_embd, _, seqs, length, batch = SHAPES[shape]
        batch = args.batch_size or batch
        res = {p: run_child(shape, p, repeat, args.threads, batch) for p in PIPELINES}
        base, fwd = res["baseline"]["peak_mb"], res["forward"]["seconds"]
        lw, th = res["lawwatch"], res["theirs"]
        extra_lw, extra_th = lw["seconds"] - fwd, th["seconds"] - fwd
        diff = float(np.max(np.abs(np.array(lw["prs"]) - np.array(th["prs"]))))
        mem = {p: res[p]["peak_mb"] - base for p in ("forward", "lawwatch", "theirs")}
        rows.append(
            f"| {n_layer} x {n_embd} | {seqs} x {length} ({lw['examples']}) | {batch} "
            f"| {fwd:.2f} | {lw['seconds']:.2f} | {th['seconds']:.2f} "
            f"| {extra_lw:.2f} ({extra_lw / fwd:.0%}) | {extra_th:.2f} ({extra_th / fwd:.0%}) "
            f"| {extra_th / extra_lw:.1f}x | {base:.0f} | {mem['forward']:.0f} "
            f"| {mem['lawwatch']:.0f} | {mem['theirs']:.0f} "
            f"| {mem['theirs'] / max(mem['lawwatch'], 1):.1f}x | {diff:.1e} |"
        )
        for p in ("forward", "lawwatch", "theirs"):
            print(f"{shape}: {p} wall s {res[p]['times']} CPU s {res[p]['cpus']}")
        cpu = {p: res[p]["cpu"] for p in ("forward", "lawwatch", "theirs")}
        extra = (cpu["lawwatch"] - cpu["forward"], cpu["theirs"] - cpu["forward"])
        print(
            f"{shape}: CPU s best: forward {cpu['forward']:.2f} lawwatch {cpu['lawwatch']:.2f} "
            f"theirs {cpu['theirs']:.2f}; beyond the forward: lawwatch {extra[0]:.2f} "
            f"({extra[0] / cpu['forward']:.0%}) theirs {extra[1]:.2f} "
            f"({extra[1] / cpu['forward']:.0%}), ratio {extra[1] / extra[0]:.1f}x"
        )
        print(f"{shape}: lawwatch PR {np.round(lw['prs'], 6).tolist()}")
        print(f"{shape}: theirs   PR {np.round(th['prs'], 6).tolist()}")
    print(
        f"load average at end={os.getloadavg()[0]:.2f}\n\n"
        "| blocks x d | probe (examples) | batch | forward s | lawwatch s | theirs s "
        "| lawwatch beyond forward s | theirs beyond forward s | ratio | baseline MB "
        "| forward +MB | lawwatch +MB | theirs +MB | memory ratio | max abs PR diff |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
