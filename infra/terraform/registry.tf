# Images of this project (infra/docker) and mirrors of the third-party ones the manifests use.
resource "google_artifact_registry_repository" "images" {
  repository_id = var.name
  location      = var.region
  format        = "DOCKER"
  description   = "maeclip training and evaluation images, and mirrored third-party images"
  labels        = var.labels
  depends_on    = [google_project_service.enabled]
  # checkov:skip=CKV_GCP_84:images hold public code and pinned public packages; Google-managed encryption suffices
  # Tags name releases: a pushed tag never moves.
  docker_config {
    immutable_tags = true
  }
  cleanup_policies {
    id     = "delete-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "${var.untagged_image_retention_days * 86400}s"
    }
  }
}
