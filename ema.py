"""The target encoder: a frozen copy of the context encoder, moved only by an exponential moving average.

Paper, Sec. 3: "the target-encoder weights are updated via an exponential moving average of the
context-encoder weights", with momentum ramped linearly from 0.996 to 1.0 (Appendix A). Two
properties keep I-JEPA from collapsing to a constant, and both live here:
  * the target is never trained: its parameters have requires_grad off and never enter an
    optimizer, so the loss cannot pull the target toward the predictor (stop-gradient, BYOL/SimSiam);
  * the target moves slowly: with momentum near 1 it averages many past encoders and changes
    little per step, so the online branch chases a slowly moving goal instead of co-adapting with it.
Mirrors the `momentum_scheduler` generator and the EMA loop in the official src/train.py, as pure
functions of the step (resuming needs no replay) and one fused in-place update instead of a Python
loop over tensors.
"""
import copy

import torch


def make_target(online):
    """A deep copy of `online` with every parameter frozen (requires_grad off), in eval mode."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


def momentum_at(step, total_steps, start=0.996, end=1.0):
    """The official linear ramp: start at step 0, end at step total_steps (clamped beyond)."""
    return start + (end - start) * min(step / max(total_steps, 1), 1.0)


@torch.no_grad()
def ema_update(target, online, momentum):
    """In place: target = m * target + (1 - m) * online, for all parameters at once; buffers copied.

    lerp(t, o, 1 - m) = t + (1 - m) (o - t) = m t + (1 - m) o: one fused kernel per dtype group.
    """
    t_params, o_params = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - momentum)
    for t_buf, o_buf in zip(target.buffers(), online.buffers()):
        t_buf.copy_(o_buf)
