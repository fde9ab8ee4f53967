"""Deployment on engines that already scale (Ray Serve; Kubernetes manifests in deploy/)."""
