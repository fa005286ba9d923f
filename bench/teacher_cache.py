"""Teacher logits on the fly or cached? Measured for a classifier student and for the Shakespeare LM student
(issue 18: "teacher logits computed on the fly under no_grad, or cached when the data is small").

Classifier: ``distill_classifier`` with ``cache=True`` (the teacher runs once over the training split, in eval
mode; each step reads its records' rows) against ``cache=False`` (a teacher forward per batch under
``no_grad``), the same student, steps and batches; the cached arm's time includes building the cache. The two
arms take turns, ``--rounds`` times.

LM (``configs/shakespeare_char.yaml``'s shapes: a 4 x 128 teacher, a 2-layer student, batch 12, context 64,
65 characters): the loop draws random windows, so a cache must hold logits per drawn window. Measured: the
teacher's share of a step (its forward under ``no_grad`` against the student's forward, backward and
optimizer step), which is the most a cache could save, and the sizes a cache would take.

    .venv/bin/python bench/teacher_cache.py              # about 2 min on a quiet 2-core machine
    .venv/bin/python bench/teacher_cache.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: E402

from forgeline.tasks.compress.classify import distill_classifier  # noqa: E402
from forgeline.tasks.compress.distill import DistillSettings, distillation_loss  # noqa: E402
from forgeline.tasks.compress.student import build_student, resolve_student  # noqa: E402
from forgeline.tasks.config import CompressConfig, TrainConfig  # noqa: E402
from forgeline.tasks.train.batches import sample_batch  # noqa: E402
from forgeline.tasks.train.classify_data import LabeledSplit  # noqa: E402
from forgeline.tasks.train.schedule import make_optimizer  # noqa: E402

SHAPE = {"n_positions": 64, "n_embd": 128, "n_layer": 4, "n_head": 4}


def classifier_arm(records: int, steps: int, rounds: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (records,), generator=gen).tolist()
    ids = [torch.randint(1, 100, (n,), generator=gen).tolist() for n in lengths]
    train = LabeledSplit(ids=ids, labels=torch.tensor([(sum(x) // 7) % 4 for x in ids]))
    val = LabeledSplit(ids=ids[:32], labels=train.labels[:32])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, num_labels=4, pad_token_id=0, bos_token_id=0, eos_token_id=0, **SHAPE)
    teacher = GPT2ForSequenceClassification(config).eval()
    spec = resolve_student(CompressConfig(n_layer=2), teacher.config)
    cfg = TrainConfig(
        max_steps=steps, batch_size=12, learning_rate=1e-3, warmup_steps=0, eval_interval=steps,
        checkpoint_interval=steps, log_interval=steps, device="cpu", dtype="float32",
    )  # fmt: skip
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}  # process CPU time: what a busy machine distorts least
    for r in range(-1, rounds):  # round -1 warms up (allocator, kernels) and is not counted
        for cache in (r % 2 == 0, r % 2 == 1):
            student = build_student(teacher, spec, seed=1)
            settings = DistillSettings(
                train=cfg, block_size=64, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5, seed=1, run_hash=f"h{r}{cache}"
            )
            with tempfile.TemporaryDirectory() as tmp:
                t0, c0 = time.perf_counter(), time.process_time()
                distill_classifier(
                    student, teacher, train, val, settings, Path(tmp), pad_id=0, device=torch.device("cpu"), cache=cache
                )
                if r >= 0:
                    times[cache].append(time.perf_counter() - t0)
                    cpu[cache].append(time.process_time() - c0)
    on_fly, cached = statistics.median(times[False]), statistics.median(times[True])
    return {
        "records": records,
        "steps": steps,
        "epochs": round(steps * 12 / records, 2),
        "on_the_fly_s": [round(t, 2) for t in times[False]],
        "cached_s": [round(t, 2) for t in times[True]],
        "speedup": round(on_fly / cached, 2),
        "on_the_fly_cpu_s": [round(t, 2) for t in cpu[False]],
        "cached_cpu_s": [round(t, 2) for t in cpu[True]],
        "cpu_speedup": round(statistics.median(cpu[False]) / statistics.median(cpu[True]), 2),
        "cache_bytes": records * 4 * 4,
    }


def lm_arm(steps: int, train_chars: int) -> dict[str, object]:
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=65, bos_token_id=0, eos_token_id=0, **SHAPE)).eval()
    student = build_student(teacher, resolve_student(CompressConfig(n_layer=2), teacher.config), seed=1)
    cfg = TrainConfig(batch_size=12, learning_rate=1e-3, device="cpu", dtype="float32")
    optimizer = make_optimizer(student, cfg, torch.device("cpu"))
    data = torch.randint(0, 65, (train_chars,))
    gen = torch.Generator().manual_seed(0)
    t_teacher, t_student = [], []  # process CPU time per part (one thread)
    for _ in range(steps):
        x, y = sample_batch(data, 12, 64, gen)
        t0 = time.process_time()
        with torch.no_grad():
            t_logits = teacher(input_ids=x, use_cache=False).logits
        t1 = time.process_time()
        s_logits = student(input_ids=x, use_cache=False).logits
        loss, _, _ = distillation_loss(s_logits, t_logits, y, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.process_time()
        t_teacher.append(t1 - t0)
        t_student.append(t2 - t1)
    teacher_ms, student_ms = statistics.median(t_teacher) * 1e3, statistics.median(t_student) * 1e3
    windows = train_chars - 64
    return {
        "steps_timed": steps,
        "teacher_forward_ms": round(teacher_ms, 2),
        "student_step_ms": round(student_ms, 2),
        "teacher_share": round(teacher_ms / (teacher_ms + student_ms), 3),
        "best_case_speedup_if_cached": round((teacher_ms + student_ms) / student_ms, 2),
        "logits_per_step_bytes": 12 * 64 * 65 * 4,
        "cache_every_window_bytes": windows * 64 * 65 * 4,
        "expected_repeated_windows_in_200_steps": round((200 * 12) ** 2 / (2 * windows), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread keeps the arms comparable
    if args.smoke:
        args.records, args.steps, args.rounds = 48, 6, 1
    out = {
        "classifier": classifier_arm(args.records, args.steps, args.rounds),
        "lm": lm_arm(max(10, args.steps // 2), 1_003_854),  # tinyshakespeare's 90% training split, in characters
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
