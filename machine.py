"""The machine a run is on: the device and the processes (one CPU, one GPU, or torchrun's many), the precision,
a step skipped on the device, the bit-for-bit mode, peak memory, and the facts that decide a run's numbers
besides its flags. Used by train.py and bench.py.

On a CPU the precision is measured, not guessed: whether bfloat16 beats float32 depends on more than the
instruction set (one AVX-512 BF16 CPU ran bf16 at 2x float32's speed, another at 0.73x; RESULTS.md).
"""
import os
import resource
import time

import torch
import torch.distributed as dist

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BF16_MARGIN = 1.1  # bfloat16 rounds to 8 bits: on a CPU it must beat float32 by 10% to be chosen


def matmul_speed(dtype, width, tokens=4096, seconds=0.1):
    """GFLOP/s of a linear layer of the model's shape, (tokens, width) x (width, 4 width) as in its MLP, in `dtype`,
    with the threads in force, timed for about `seconds` after one warm-up call. Its own generator: a run's random
    numbers are untouched, so a measured run repeats one given its precision."""
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(n, width, generator=g).to(dtype) for n in (tokens, 4 * width))
    torch.nn.functional.linear(x, w)  # oneDNN picks its kernel
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        torch.nn.functional.linear(x, w)
        calls += 1
    return 2 * tokens * width * 4 * width * calls / (time.perf_counter() - start) / 1e9


def cpu_choice(speeds):
    """The precision a CPU trains in, given {float32: GFLOP/s, bfloat16: GFLOP/s}: bfloat16 where it is at least
    BF16_MARGIN times float32's speed."""
    return torch.bfloat16 if speeds[torch.bfloat16] >= BF16_MARGIN * speeds[torch.float32] else torch.float32


def autocast_dtype(device, requested=None, log=print, *, recorded=None, width=768):
    """The precision of a run: --dtype when given; a resumed run's recorded one (so resuming stays exact whatever
    this machine would pick). Else on a GPU bfloat16 since Ampere, float16 with GradScaler before it. On a CPU,
    float32 where oneDNN has no bfloat16 at all (emulated, ~60x slower on an AVX2-only CPU), else whichever of
    the two ran a matmul of the model's width faster here (cpu_choice), said on one line with both figures."""
    if requested or recorded:
        return getattr(torch, requested or recorded)
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] >= 8:  # Ampere and later
            return torch.bfloat16
        log("note: this GPU has no native bfloat16: float16 with loss scaling (--dtype float32 to avoid it)")
        return torch.float16
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log("note: this CPU has no native bfloat16 (no AVX-512/AMX): training in float32 (--dtype bfloat16 forces it)")
        return torch.float32
    speeds = {dtype: matmul_speed(dtype, width) for dtype in (torch.float32, torch.bfloat16)}
    chosen = cpu_choice(speeds)
    log(f"precision: {str(chosen)[6:]}, measured here: a linear layer of width {width} ran at "
        f"{speeds[torch.bfloat16]:.0f} GFLOP/s in bfloat16, {speeds[torch.float32]:.0f} in float32 "
        f"(bfloat16 needs {BF16_MARGIN}x; --dtype forces one)")
    return chosen


def facts(device, dtype):
    """What decides a run's numbers besides its flags and seed, in words without spaces (they go into the summary
    line): torch's version, the threads, the CPU (model, kernel level, bf16 and AMX) or the GPU, the precision."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                     "cpu")
        flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
        where = "/".join([model, torch.backends.cpu.get_cpu_capability()] + ["avx512_bf16"] * ("avx512_bf16" in flags)
                         + ["amx"] * ("amx_bf16" in flags))
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(), device.type: where.replace(" ", "_"),
            "dtype": str(dtype).removeprefix("torch.")}


def step_unless(optimizer, skipped):
    """optimizer.step(), with no effect where `skipped` (0-d, 1.0 after a non-finite loss) is set, decided on the
    device. Fused optimizers (AdamW, SGD) skip their whole update themselves where `found_inf` is set; any other
    steps, then puts its weights and state back from a copy kept aside (state born in a skipped step is zeroed:
    Adam's as new). State on the host (Adam's step count without capturable=True) makes the copy wait for it."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped
        optimizer.step()
        del optimizer.found_inf
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = lambda i, p: [("weight", p), *optimizer.state[p].items()] if p.grad is not None else []  # noqa: E731
    before = {(i, k): v.clone() for i, p in enumerate(params) for k, v in held(i, p) if torch.is_tensor(v)}
    optimizer.step()
    with torch.no_grad():
        for i, p in enumerate(params):
            for k, v in held(i, p):
                if torch.is_tensor(v):
                    v.copy_(torch.where(skipped.to(v.device).bool(), before.get((i, k), torch.zeros_like(v)), v))


def deterministic_mode():
    """--deterministic, before any CUDA work (cuBLAS reads its workspace setting when it starts): kernels that add
    in a fixed order (attention backward without split keys, cuDNN without atomics); one with none raises."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def setup_processes(args):
    """Device and processes -> (ddp, device, rank, world, log). torchrun sets RANK; a plain run never touches
    torch.distributed. Only rank 0 prints."""
    ddp = "RANK" in os.environ
    if args.deterministic:
        deterministic_mode()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    return ddp, device, rank, world, print if rank == 0 else (lambda *a, **k: None)


def setup_precision(args, device, log, recorded=None, width=768):
    """The run's precision (autocast_dtype), one for every rank (rank 0's measurement), into args.dtype, which the
    checkpoint records -> (dtype, its autocast context, the loss scaler). bf16 has float32's exponent range, so
    its gradients cannot underflow: no GradScaler (the official code uses one anyway); float16 does need one."""
    dtype = autocast_dtype(device, args.dtype, log, recorded=recorded, width=width)
    if dist.is_available() and dist.is_initialized():
        code = torch.tensor([DTYPES.index(dtype)], device=device)
        dist.broadcast(code, 0)
        dtype = DTYPES[int(code.item())]
    args.dtype = str(dtype).removeprefix("torch.")
    return (dtype, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
