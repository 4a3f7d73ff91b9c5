"""Launchers: render (and with --apply, submit) what runs a recipe or a model elsewhere.
pytorchjob.py: a Kubeflow PyTorchJob for training, whose pods run pod_entrypoint.py;
deploy.py: a Deployment + Service (+ autoscaler) serving an exported model;
k8s_objects.py: the Kubernetes objects and checks they share."""
