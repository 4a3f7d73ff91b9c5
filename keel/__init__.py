"""Keel's command line and launchers: the `keel` command (keel/cli.py), the quickstart, and the
launchers that run a recipe elsewhere (keel/launch/: a Kubeflow PyTorchJob and its pod
entrypoint, a serving Deployment). The top of the import graph: it may import `data`,
`trainer` and `serving`; none of them imports it (docs/architecture.md).
"""
