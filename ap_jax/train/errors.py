"""The trainer's errors: a run that cannot go on, and a stage stopped by a signal inside a longer job."""

class TrainError(RuntimeError):
  pass


class Stopped(Exception):
  """A job of several stages (demo, compare) was asked to stop (SIGTERM / Ctrl-C) while one was training: that
  stage saved a checkpoint, and the job stops instead of going on to the next stage with a half-trained one."""

  def __init__(self, signal_name: str, what: str):
    self.signal_name = signal_name
    super().__init__(f"stopped by {signal_name} while training {what}; its checkpoint is saved, and the same "
                     "command resumes the job")
