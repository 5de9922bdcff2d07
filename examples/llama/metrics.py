"""What a user sees and keeps of a run: a progress line, metrics.jsonl and TensorBoard events."""

import json
import math
import pathlib
import sys
import time


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
  """A progress bar on a terminal (stderr), and one metrics line per logging step on stdout."""

  def __init__(self, total_steps: int, start_step: int, stream=None):
    self.total, self.start = total_steps, start_step
    self.stream = stream or sys.stderr
    self.live = self.stream.isatty()
    self.t0 = time.perf_counter()
    self.last = ""
    self.drawn_at = 0.0

  def eta(self, step: int) -> float:
    done = step - self.start
    if done <= 0:
      return math.inf
    return (time.perf_counter() - self.t0) / done * (self.total - step)

  def bar(self, step: int) -> None:
    """Redraws the bar, at most ten times a second, when stderr is a terminal."""
    now = time.perf_counter()
    if not self.live or (now - self.drawn_at < 0.1 and step < self.total):
      return
    self.drawn_at = now
    width = 24
    filled = int(width * step / self.total)
    line = (
      f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
      f"{self.last} ETA {_duration(self.eta(step))}"
    )
    self.stream.write(line.ljust(100)[:120])
    self.stream.flush()

  def log(self, step: int, loss: float, tokens_per_s: float, tflops: float, step_s: float) -> None:
    self.last = f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s"
    self.say(
      f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
      f"{tflops:.3f} TFLOP/s | {step_s:.3f} s/step | ETA {_duration(self.eta(step))}"
    )

  def say(self, line: str) -> None:
    """Prints a line on stdout, above the bar."""
    if self.live:
      self.stream.write("\r" + " " * 120 + "\r")
      self.stream.flush()
    print(line, flush=True)

  def close(self) -> None:
    if self.live:
      self.stream.write("\n")
      self.stream.flush()


class _TensorBoardPlain:
  """Scalars through the `tensorboard` package's own event writer (no TensorFlow needed)."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._writer = EventFileWriter(logdir)

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=value)])
    self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    self._writer.close()


def tensorboard_writer(logdir: pathlib.Path):
  """A writer with add_scalar/close from tensorboardX or tensorboard, or None if neither imports."""
  try:
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir))
  except ImportError:
    pass
  try:
    return _TensorBoardPlain(str(logdir))
  except ImportError:
    return None


class MetricsLog:
  """Records in run_dir/metrics.jsonl, and scalars in TensorBoard when it is installed.

  A new run starts the file afresh; a resumed one keeps the records up to its checkpoint.
  """

  def __init__(self, run_dir: pathlib.Path, resume_step: int | None):
    self.path = run_dir / "metrics.jsonl"
    kept = []
    if resume_step is not None and self.path.exists():
      # Records past the checkpoint belong to the interrupted tail that is being redone.
      kept = [
        line
        for line in self.path.read_text().splitlines()
        if line and json.loads(line)["step"] <= resume_step
      ]
    self.path.write_text("".join(line + "\n" for line in kept))
    self.file = open(self.path, "a")
    self.tensorboard = tensorboard_writer(run_dir / "tensorboard")

  def write(self, record: dict) -> None:
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.tensorboard is not None:
      step = record["step"]
      for key, value in record.items():
        if key not in ("step", "kind") and isinstance(value, (int, float)):
          self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, step)

  def close(self) -> None:
    self.file.close()
    if self.tensorboard is not None:
      self.tensorboard.close()


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line]
