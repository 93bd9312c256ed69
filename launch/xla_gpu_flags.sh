# shellcheck shell=bash
# XLA flags that matter for training throughput on NVIDIA GPUs. Source it before starting the trainer:
#
#   source launch/xla_gpu_flags.sh && python -m cpt_jax.train ...
#
# It appends to XLA_FLAGS; a flag already in XLA_FLAGS keeps the value given there, so you can
# override any of these. Every name was checked against the installed jaxlib: XLA refuses to start
# on an unknown flag, and tests/test_launch.py starts JAX with all of them (on CPU) to keep it so.
# Flags change between jaxlib versions: when one disappears, delete it here.

_cpt_xla_gpu_flags=(
  # Overlap communication with compute: schedule the async collectives early, so FSDP's
  # all-gathers and the gradient reduce-scatters run while matmuls do.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # cuBLAS/cuBLASLt for matmuls instead of Triton-generated GEMMs: as fast or faster for the large
  # bf16 matmuls of a transformer, and much less autotuning at compile time.
  --xla_gpu_enable_triton_gemm=false
  # No CUDA graphs (the empty list disables every command type): they pay off for small,
  # launch-bound steps; a large model's step is not, and graphs cost memory and compile time.
  --xla_gpu_enable_command_buffer=
  # Combine many small collectives into few large ones (bytes per combined op). Larger means fewer
  # NCCL launches but more memory held at once; these suit 7B-70B models, tune per model.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  # Combine all-gathers / reduce-scatters whatever dimension they gather or scatter along (false),
  # not only those sharing one: more combining for the differently sharded weights of a layer.
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  # Pipeline collectives across the iterations of the layer loop (scan over layers): layer i+1's
  # parameter all-gather and layer i-1's gradient reduce-scatter overlap layer i's compute.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll the layer loop by two so the pipelined collectives have a next iteration to overlap with.
  --xla_gpu_enable_while_loop_double_buffering=true
)

_cpt_xla_flags="${XLA_FLAGS:-}"
for _cpt_flag in "${_cpt_xla_gpu_flags[@]}"; do
  case " $_cpt_xla_flags " in
    *" ${_cpt_flag%%=*}="*) ;; # already set by the caller: keep theirs
    *) _cpt_xla_flags="${_cpt_xla_flags:+$_cpt_xla_flags }$_cpt_flag" ;;
  esac
done
export XLA_FLAGS="$_cpt_xla_flags"
unset _cpt_xla_gpu_flags _cpt_xla_flags _cpt_flag
