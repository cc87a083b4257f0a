output "cluster_name" {
  description = "GKE cluster: gcloud container clusters get-credentials NAME --region REGION."
  value       = google_container_cluster.main.name
}

output "image_repository" {
  description = "Docker repository to push the maeclip image (infra/docker) and mirrored images to."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "buckets" {
  description = "Storage URLs for MDS shards, checkpoints (run_url roots) and MLflow artifacts."
  value = {
    data        = google_storage_bucket.data.url
    checkpoints = google_storage_bucket.checkpoints.url
    mlflow      = google_storage_bucket.mlflow.url
  }
}

output "pipeline_service_account" {
  description = "Annotate Kubeflow Pipelines' runner with it: iam.gke.io/gcp-service-account (k8s/README.md)."
  value       = google_service_account.pipeline.email
}

output "kustomize_settings" {
  description = "The contents of k8s/overlays/gke/settings.env for this project."
  value       = <<-EOT
    TRAINER_GSA=${google_service_account.trainer.email}
    MLFLOW_GSA=${google_service_account.mlflow.email}
    MLFLOW_ARTIFACTS_DESTINATION=${google_storage_bucket.mlflow.url}
    CLOUDSQL_INSTANCE=${google_sql_database_instance.mlflow.connection_name}
    MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://${urlencode(google_sql_user.mlflow.name)}@127.0.0.1:5432/${google_sql_database.mlflow.name}
  EOT
}
