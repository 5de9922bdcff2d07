"""Several hosts (processes) in one run: `jax.distributed`, joined with one-line errors.

Every process runs the same command with its own --process-id (0 .. --num-processes - 1);
process 0 runs the coordinator at --coordinator-address (HOST:PORT, reachable from every
host). With --num-processes 0, `jax.distributed.initialize` reads all three from the launcher's
environment (SLURM, Open MPI, Cloud TPU pods, ...). Each process then sees every device of the
job (`jax.devices()`) and drives its own (`jax.local_devices()`): the mesh spans them all, each
process loads only its rows of the global batch, and Orbax saves each process's shards.

`jax.distributed.initialize` ends a process it cannot connect with a multi-line fatal error
(SIGABRT) after its timeout, and accepts processes that disagree on the process count; so
before it, the processes meet once at the coordinator's address (a plain TCP exchange, the
port then handed to JAX): a process that cannot reach process 0, a missing process, process
counts that disagree or an id given twice end every process concerned with a one-line
`ConfigError` naming the flag, within --distributed-timeout seconds.
"""

import os
import socket
import time

import jax

from examples.llama.config import ConfigError, TrainConfig

ADDRESS_VARIABLE = "JAX_COORDINATOR_ADDRESS"  # what jax.distributed reads when no address is given


def coordinator_address(cfg: TrainConfig) -> str:
  return cfg.coordinator_address or os.environ.get(ADDRESS_VARIABLE, "")


def _address_flag(cfg: TrainConfig) -> str:
  return "--coordinator-address" if cfg.coordinator_address else f"${ADDRESS_VARIABLE}"


def _use_gloo() -> None:
  """CPU collectives across processes (the option's name varies with the JAX version)."""
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    jax.config.update("jax_cpu_enable_gloo_collectives", True)


def _host_port(cfg: TrainConfig) -> tuple[str, int]:
  address = coordinator_address(cfg)
  if not address:
    raise ConfigError(
      f"--num-processes {cfg.num_processes} needs --coordinator-address HOST:PORT (process 0's"
      f" host, a free port), or ${ADDRESS_VARIABLE}"
    )
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(
      f"{_address_flag(cfg)} {address!r} is not HOST:PORT (process 0's host, a free port)"
    )
  return host.strip("[]"), int(port)


def _listen(port: int) -> socket.socket:
  if socket.has_dualstack_ipv6():
    return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
  return socket.create_server(("", port))


def _line(conn: socket.socket) -> str:
  data = b""
  while not data.endswith(b"\n"):
    chunk = conn.recv(1024)
    if not chunk:
      break
    data += chunk
  return data.decode(errors="replace").strip()


def _coordinate(cfg: TrainConfig, port: int, deadline: float) -> None:
  """Process 0: waits for the other processes' "id count" lines, answers all with one verdict."""
  try:
    server = _listen(port)
  except OSError as error:
    raise ConfigError(
      f"process 0 cannot listen on the port of {_address_flag(cfg)} "
      f"{coordinator_address(cfg)}: {error.strerror}; pick a free port"
    ) from None
  conns, joined, verdict = [], set(), ""
  try:
    while len(joined) < cfg.num_processes - 1 and not verdict:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        missing = sorted(set(range(1, cfg.num_processes)) - joined)
        verdict = (
          f"--num-processes {cfg.num_processes}: process(es) {missing} did not reach "
          f"{_address_flag(cfg)} {coordinator_address(cfg)} within --distributed-timeout "
          f"{cfg.distributed_timeout} s"
        )
        break
      server.settimeout(remaining)
      try:
        conn, _ = server.accept()
      except TimeoutError:
        continue
      conn.settimeout(max(remaining, 1.0))
      try:
        pid, count = (int(x) for x in _line(conn).split())
      except (ValueError, OSError):
        conn.close()  # not one of ours
        continue
      conns.append(conn)
      if count != cfg.num_processes:
        verdict = (
          f"--num-processes differs between processes: {cfg.num_processes} on process 0, "
          f"{count} on process {pid}"
        )
      elif pid == 0 or pid in joined:
        verdict = f"--process-id {pid} is given to two processes"
      joined.add(pid)
    for conn in conns:  # the peers close first: their ends keep TIME_WAIT, not this port
      try:
        conn.sendall(f"{verdict or 'ok'}\n".encode())
        _line(conn)
      except OSError:
        pass
      conn.close()
  finally:
    server.close()
  if verdict:
    raise ConfigError(verdict)


def _join(cfg: TrainConfig, host: str, port: int, deadline: float) -> None:
  """Any other process: tells process 0 its id and count, and waits for the verdict."""
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise ConfigError(
        f"process {cfg.process_id} cannot reach process 0 at {_address_flag(cfg)} "
        f"{coordinator_address(cfg)} within --distributed-timeout {cfg.distributed_timeout} s;"
        " start process 0 on that host, or fix the address"
      )
    try:
      conn = socket.create_connection((host, port), timeout=min(remaining, 5.0))
      break
    except OSError:
      time.sleep(min(0.2, max(remaining, 0)))
  with conn:
    conn.settimeout(max(deadline - time.monotonic(), 1.0))
    try:
      conn.sendall(f"{cfg.process_id} {cfg.num_processes}\n".encode())
      verdict = _line(conn)
    except OSError:
      verdict = ""
  if verdict != "ok":
    raise ConfigError(
      verdict
      or f"process {cfg.process_id}: no answer from process 0 at {_address_flag(cfg)} "
      f"{coordinator_address(cfg)} within --distributed-timeout {cfg.distributed_timeout} s"
    )


def initialize(cfg: TrainConfig) -> None:
  """Joins this process to the run's other processes; nothing for a one-process run.

  Call before anything asks JAX for devices.
  """
  if cfg.num_processes == 1:
    return
  if cfg.num_processes == 0:  # the launcher's environment says everything
    _use_gloo()
    jax.distributed.initialize(initialization_timeout=cfg.distributed_timeout)
    return
  host, port = _host_port(cfg)
  deadline = time.monotonic() + cfg.distributed_timeout
  if cfg.process_id == 0:
    _coordinate(cfg, port, deadline)
  else:
    _join(cfg, host, port, deadline)
  _use_gloo()
  jax.distributed.initialize(
    coordinator_address(cfg),
    cfg.num_processes,
    cfg.process_id,
    initialization_timeout=max(int(deadline - time.monotonic()), 10),
  )


def check_mesh(cfg: TrainConfig) -> None:
  """A multi-process mesh must hold every process's devices (each loads its rows of a batch)."""
  if jax.process_count() == 1:
    return
  devices = cfg.data_parallel * cfg.fsdp
  if devices != jax.device_count():
    raise ConfigError(
      f"--data-parallel {cfg.data_parallel} × --fsdp {cfg.fsdp} = {devices} devices; "
      f"the {jax.process_count()} processes have {jax.device_count()}: use them all"
    )


def local_rows(batch_sharding, batch_shape) -> range:
  """The rows of the global batch that this process's devices hold (one contiguous block)."""
  slices = batch_sharding.addressable_devices_indices_map(tuple(batch_shape)).values()
  rows = sorted({i for s in slices for i in range(*s[0].indices(batch_shape[0]))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"this process's rows of the batch are not one block: {rows}")
  return range(rows[0], rows[-1] + 1)
