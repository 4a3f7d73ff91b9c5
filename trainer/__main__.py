from trainer.resilience.launcher import end_with_launcher, leave, report_fatal_signals

end_with_launcher()  # first: a worker must not outlive torchrun, even while it imports
report_fatal_signals()

from trainer.train import main  # noqa: E402

leave(main())
