"""The public functional API: fused SEDD operations behind one interface.

Every function here validates its arguments (raising ``TypeError``/``ValueError`` that name the
argument, before any kernel launches), then dispatches to a backend (:mod:`sedd.ops.backend`):

========================  ==============================  ======================================
backend                   built-in graphs (absorb,        a graph without a kernel
                          uniform: ``graph.kernel`` set)  (``graph.kernel is None``)
========================  ==============================  ======================================
``"triton"``              :mod:`sedd.ops.custom_ops`      ``RuntimeError`` (no kernel)
                          (the kernels of sedd.kernels)
``"torch"``               :mod:`sedd.ops.eager`           :mod:`sedd.ops.reference`
                          (truncated steps too)           (the graph's own math)
``"auto"`` (default)      Triton for CUDA tensors,        :mod:`sedd.ops.reference`
                          eager otherwise
========================  ==============================  ======================================

:mod:`sedd.ops.reference` is also the oracle of the tests and the baseline of the benchmarks.
On CPU tensors "triton" needs Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels
are imported); anything else is an error, never a silent fallback.

The backend is chosen by the environment variable ``SEDD_BACKEND`` or, taking precedence, the
context manager :func:`use_backend`; :func:`last_backend` says which one ran the latest call in
this thread. Setting ``SEDD_CHECK_VALUES=0`` (or the context manager :func:`value_checks`) skips
the value checks that need a device sync (token ids in range, σ finite and positive); shape,
dtype and device checks always run (:mod:`sedd.ops.checks`).

Shapes: B batch, L length, V score width (N + 1 for the absorbing graph, N for uniform).
``log_score`` is [B, L, V] in fp32, bf16, fp16 (or fp64 on the eager backend) and is read in
fp32. Optional ``shift`` [B]: ``log_score`` is then the raw network output z and the scores are
ŝ = z + shift (the σ-dependent post-processing of the model, folded in so no extra [B, L, V]
pass runs). In every case the entry at the current token is read as ŝ[x_t] = 0.

Token ids (``x_t``, ``x0``) may be int64, int32, int16 or uint8 on both backends, provided the
dtype holds every id the op reads or writes ([0, V) for x_t, [0, N) for x0); a narrower dtype is
a ``TypeError`` up front. The steps return x_t's dtype.

:func:`launch_options` sets the fused kernels' tile, warps and pipelining depth inside a block;
:func:`kernel_launch` prepares one call and returns its bare kernel launch (kernel time apart from
the op's host work, :mod:`sedd.ops.prepared`).

Files: the loss in :mod:`sedd.ops.loss`, forward noising in :mod:`sedd.ops.noising`, the reverse
steps in :mod:`sedd.ops.steps` (with the denoise step that also returns each position's confidence
and entropy; the truncation's threshold in :mod:`sedd.ops.truncation`), the
output head fused with the loss in :mod:`sedd.ops.linear`, and
the head fused with the next-token cross entropy of the autoregressive baseline in
:mod:`sedd.ops.cross_entropy` (plain torch on every device).
"""

from sedd.ops.backend import BACKENDS, get_backend, last_backend, launch_options, resolve_backend, use_backend
from sedd.ops.checks import TOKEN_DTYPES, checking_values, host_sync_allowed, sync_free, value_checks
from sedd.ops.cross_entropy import linear_cross_entropy
from sedd.ops.linear import linear_score_entropy
from sedd.ops.loss import score_entropy
from sedd.ops.noising import sample_transition
from sedd.ops.prepared import kernel_launch
from sedd.ops.steps import TRUNCATION, analytic_step, denoise_step, denoise_with_stats, euler_step

__all__ = [
    "BACKENDS", "TOKEN_DTYPES", "TRUNCATION",
    "score_entropy", "linear_score_entropy", "linear_cross_entropy", "sample_transition", "euler_step", "analytic_step", "denoise_step",
    "denoise_with_stats",
    "get_backend", "use_backend", "resolve_backend", "last_backend", "launch_options", "kernel_launch",
    "value_checks", "checking_values", "sync_free", "host_sync_allowed",
]
