# Google service accounts, each with only the roles its workload needs, bound to Kubernetes service
# accounts through workload identity: no keys exist anywhere.
locals {
  workload_pool = google_container_cluster.main.workload_identity_config[0].workload_pool
  node_roles = ["roles/logging.logWriter", "roles/monitoring.metricWriter", "roles/monitoring.viewer",
  "roles/stackdriver.resourceMetadata.writer"]
  # Who may read or write each bucket: trainers read shards and write checkpoints; pipeline steps write
  # shards (ingest) and checkpoint-side reports (evaluation, gate); MLflow owns its artifact root.
  bucket_grants = {
    trainer-data         = { bucket = google_storage_bucket.data.name, role = "roles/storage.objectViewer", member = google_service_account.trainer.member }
    trainer-checkpoints  = { bucket = google_storage_bucket.checkpoints.name, role = "roles/storage.objectAdmin", member = google_service_account.trainer.member }
    pipeline-data        = { bucket = google_storage_bucket.data.name, role = "roles/storage.objectAdmin", member = google_service_account.pipeline.member }
    pipeline-checkpoints = { bucket = google_storage_bucket.checkpoints.name, role = "roles/storage.objectAdmin", member = google_service_account.pipeline.member }
    mlflow-artifacts     = { bucket = google_storage_bucket.mlflow.name, role = "roles/storage.objectAdmin", member = google_service_account.mlflow.member }
  }
  # Kubernetes service account (namespace/name) that acts as each Google service account.
  workload_identities = {
    trainer  = { gsa = google_service_account.trainer.name, ksa = "${var.k8s_namespace}/${var.trainer_ksa}" }
    mlflow   = { gsa = google_service_account.mlflow.name, ksa = "${var.k8s_namespace}/${var.mlflow_ksa}" }
    pipeline = { gsa = google_service_account.pipeline.name, ksa = "${var.kfp_namespace}/${var.kfp_ksa}" }
  }
}

resource "google_service_account" "nodes" {
  account_id   = "${var.name}-nodes"
  display_name = "maeclip GKE nodes"
}

resource "google_service_account" "trainer" {
  account_id   = "${var.name}-trainer"
  display_name = "maeclip training jobs"
}

resource "google_service_account" "mlflow" {
  account_id   = "${var.name}-mlflow"
  display_name = "maeclip MLflow tracking server"
}

resource "google_service_account" "pipeline" {
  account_id   = "${var.name}-pipeline"
  display_name = "maeclip Kubeflow Pipelines steps"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset(local.node_roles)
  project  = var.project_id
  role     = each.value
  member   = google_service_account.nodes.member
}

resource "google_artifact_registry_repository_iam_member" "nodes_pull" {
  repository = google_artifact_registry_repository.images.name
  location   = google_artifact_registry_repository.images.location
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.nodes.member
}

resource "google_storage_bucket_iam_member" "grants" {
  for_each = local.bucket_grants
  bucket   = each.value.bucket
  role     = each.value.role
  member   = each.value.member
}

# MLflow connects to Cloud SQL (client) and logs in as its IAM database user (instanceUser).
resource "google_project_iam_member" "mlflow_cloudsql" {
  for_each = toset(["roles/cloudsql.client", "roles/cloudsql.instanceUser"])
  project  = var.project_id
  role     = each.value
  member   = google_service_account.mlflow.member
}

resource "google_service_account_iam_member" "workload_identity" {
  for_each           = local.workload_identities
  service_account_id = each.value.gsa
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${each.value.ksa}]"
}
