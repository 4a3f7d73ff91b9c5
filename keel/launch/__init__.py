"""Launchers: render (and with --apply, submit) what runs a recipe or a model elsewhere.
job.py: what every `keel launch` target shares (recipe, overrides, cluster, paths, secrets);
pytorchjob.py (Kubeflow PyTorchJob), trainjob.py (Kubeflow Trainer v2 TrainJob), slurm.py (an
sbatch script) and sagemaker.py (a CreateTrainingJob request): one small renderer per target;
pod_entrypoint.py and sagemaker_entrypoint.py: the training image's entrypoints;
deploy.py: a Deployment + Service (+ autoscaler) serving an exported model;
k8s_objects.py: the Kubernetes objects and checks they share."""
