"""Restart-safe runs: a run directory is never destroyed by accident, a crash never costs more than the
steps since the last save, and a resumed run ends exactly as an uninterrupted one would.

Read top to bottom, in the order a run meets them:
  1. `claim_run`: refuse to overwrite a run (a checkpoint in --out means --resume, or another --out);
  2. `load_checkpoint` / `restore`: safe loading (weights_only) and exact resume: weights, optimizer,
     loss scaler and the step; schedules are pure functions of the step, so nothing is replayed;
  3. `open_log` / `trim_log`: log.csv loses the rows past the checkpoint, which the resumed run writes again;
  4. `catch_stop_signals` / `stop_requested`: SIGTERM and SIGUSR1 finish the current step, save, and exit
     with STOPPED_BY_SIGNAL, on every rank at once;
  5. `checkpoint_state` / `save_run` / `save_checkpoint`: what a checkpoint holds (weights under their
     modules' own names, unwrapped from DDP) and the atomic write that never stores non-finite weights;
     best.pt is the same write to another name.

Nothing here knows about I-JEPA: another training loop uses it as it is, with three calls:

    latest = claim_run(out, args)                     # args.resume / args.auto_resume; makes `out`
    start = restore(latest, modules, optimizer)["step"] if args.resume else 0
    save_run(out, checkpoint_state(modules, optimizer, None, step))   # every so often: OUT/latest.pt

(the official src/train.py saves with a plain torch.save, resumes from a path in its YAML and restarts from
epoch 0 when anything fails to load.)
"""
import csv
import os
import pickle
import signal

import torch
import torch.distributed as dist

STOPPED_BY_SIGNAL = 75  # the exit code after SIGTERM/SIGUSR1 (sysexits' EX_TEMPFAIL: "try again"); requeue on it


def claim_run(out, args):
    """-> OUT/latest.pt, once it is safe to write there. A checkpoint already in `out` is refused in one line
    naming its step, unless args.resume; with args.auto_resume the same command line starts a run or
    continues it (args.resume is set to whether there is one to continue)."""
    path = os.path.join(out, "latest.pt")
    exists = os.path.isfile(path)
    if args.auto_resume:
        args.resume = exists
    elif exists and not args.resume:
        step = peek(path).get("step")
        raise SystemExit(f"error: {path} already holds a run at step {step}: add --resume (or --auto-resume) to "
                         "continue it, or give another --out")
    os.makedirs(out, exist_ok=True)
    return path


def peek(path):
    """The checkpoint at `path` without reading its weights (mapped, not loaded): its step, args and other small
    entries, {} if there is none."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True) if os.path.isfile(path) else {}


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain containers only, never pickled code."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"error: refusing to load {path}: it holds pickled objects other than tensors "
                         f"and plain containers, which could run code ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({str(e).splitlines()[0]})") from None


def restore(path, modules, optimizer, scaler=None, config=None):
    """Load `path` into the freshly built run, in place -> the checkpoint dict (its "step" is where to go on).
    modules: {name: module} as given to checkpoint_state; config: must equal the one saved, if given."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path)
    if config is not None and ckpt.get("config") != config:
        raise SystemExit(f"error: --resume: {path} was trained with another architecture ({ckpt.get('config')}); "
                         "pass the same --model/--img-size/--patch-size/--pred-* flags")
    for name, module in modules.items():
        module.load_state_dict(ckpt[name])
    optimizer.load_state_dict(ckpt["optimizer"])  # AdamW's moments: without them the next steps jump
    if scaler is not None:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt


def trim_log(path, step):
    """Keep log.csv up to its row of `step` (its "# ..." lines and header included): the rows after the checkpoint
    are redone, so the log ends as an uninterrupted run's would. Rewritten atomically, like the checkpoint ->
    whether there was one."""
    if not os.path.isfile(path):
        return False
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
        r = next(csv.reader([line]), [])
        if r and r[0].isdigit() and not int(r[0]) <= step:
            break  # the first row past the checkpoint: it and all after it are redone
        kept.append(line)
    with open(path + ".tmp", "w", newline="") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return True


def open_log(path, header, resumed_at=None, note=None):
    """log.csv, open for appending rows: a resumed run's is first trimmed to `resumed_at` (the checkpoint's
    step), a new run's is started with `header` -> the open file. `note` (what the run runs on, say) becomes a
    "# ..." line: the first of a new log, or after the trimmed rows of a resumed one (readers skip such lines:
    pandas.read_csv(path, comment="#"))."""
    if resumed_at is not None and trim_log(path, resumed_at):
        f = open(path, "a", newline="")
        if note:
            f.write(f"# resumed at step {resumed_at}: {note}\n")
        return f
    f = open(path, "w", newline="")
    if note:
        f.write(f"# {note}\n")
    csv.writer(f).writerow(header)
    return f


def catch_stop_signals():
    """SIGTERM (what schedulers send before killing a job) and SIGUSR1 (SLURM's --signal, sent early) ask
    the loop to stop after the current step -> (the dict the handlers fill, the handlers to restore)."""
    asked = {}
    previous = {s: signal.signal(s, lambda signum, frame: asked.setdefault("signal", signum))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    return asked, previous


def restore_signals(previous):
    """Give SIGTERM and SIGUSR1 back their handlers from before catch_stop_signals (the loop is over)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def stop_requested(asked, device):
    """Whether to stop after this step. Under DDP every rank stops after the same step (a tiny all-reduce a
    step), or the ranks that go on would wait forever for the one that left."""
    stop = "signal" in asked
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor(float(stop), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


def checkpoint_state(modules, optimizer, scaler, step, **extra):
    """Everything an exact resume needs: each module's weights under its own (official) names, unwrapped
    from DDP (its `module.` prefix) and torch.compile, the optimizer and scaler, the step, and `extra`."""
    unwrap = lambda m: getattr(getattr(m, "_orig_mod", m), "module", m)  # noqa: E731
    return {**{name: unwrap(m).state_dict() for name, m in modules.items()}, "optimizer": optimizer.state_dict(),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}), "step": step, **extra}


def save_run(out, state, best=False):
    """OUT/latest.pt, and OUT/best.pt too when `best` (written after latest.pt, so it never outlives its run)."""
    save_checkpoint(os.path.join(out, "latest.pt"), state)
    if best:
        save_checkpoint(os.path.join(out, "best.pt"), state)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-save leaves the previous checkpoint whole.
    Non-finite weights are never written over a good checkpoint (a diverged run keeps its last good state)."""
    for part, weights in state.items():
        if part == "optimizer" or not isinstance(weights, dict) or not all(map(torch.is_tensor, weights.values())):
            continue  # only the modules' weights: not the optimizer, not the config
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            raise SystemExit(f"error: non-finite {part} weights at step {state['step']}; "
                             f"{path} keeps the last good state")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
