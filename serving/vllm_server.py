"""The process `keel serve` execs: vLLM's own OpenAI server (its `main`, unchanged), and an
exit status that tells a supervisor what happened.

vLLM 0.32 exits 0 when its engine process dies (seen here: EngineCore killed -> the API
server stops with status 0), so a supervisor that restarts only failed processes (systemd
Restart=on-failure, a Kubernetes Job, SageMaker) takes a dead server for a finished one.
Keel's middleware records whether the engine died without a shutdown signal; then the exit
status is 1. A SIGTERM drain still exits 0.
"""

import sys

from vllm.entrypoints.launchers.api_server.entry import main

from serving import middleware

if __name__ == "__main__":
    main()
    sys.exit(middleware.exit_status())
