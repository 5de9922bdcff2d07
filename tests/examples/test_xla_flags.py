"""The example's default XLA flags: added to the caller's, never over them."""

from examples.llama import xla_flags


def test_defaults_are_appended_to_the_callers_flags():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  added = xla_flags.set_defaults(environ)
  assert added == ["--xla_gpu_enable_triton_gemm=false"]
  assert environ["XLA_FLAGS"] == (
    "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false"
  )


def test_defaults_are_set_without_any_caller_flags_and_only_once():
  environ = {}
  assert xla_flags.set_defaults(environ) == ["--xla_gpu_enable_triton_gemm=false"]
  assert xla_flags.set_defaults(environ) == []
  assert environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"


def test_a_flag_the_caller_named_keeps_the_callers_value():
  environ = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  assert xla_flags.set_defaults(environ) == []
  assert environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
