import sys

from trainer.resilience.launcher import end_with_launcher

end_with_launcher()  # first: a worker must not outlive torchrun, even while it imports

from trainer.train import main  # noqa: E402

sys.exit(main())
