# Three buckets, one job each: MDS shards, training checkpoints, MLflow artifacts. All private (uniform
# access, public access prevented), versioned so an overwrite or delete can be undone for a few days.
locals {
  bucket_prefix = "${var.project_id}-${var.name}"
}

resource "google_storage_bucket" "data" {
  name                        = "${local.bucket_prefix}-data"
  location                    = var.region
  labels                      = var.labels
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # checkov:skip=CKV_GCP_62:access is audited by Cloud Audit Logs (data access); a log bucket would hold only copies
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }
}

# Checkpoints are never deleted by age: the gate's promoted ones must stay (docs/contracts.md §4). Old ones move to
# Nearline; the trainer itself deletes checkpoints beyond the last N.
resource "google_storage_bucket" "checkpoints" {
  name                        = "${local.bucket_prefix}-checkpoints"
  location                    = var.region
  labels                      = var.labels
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # checkov:skip=CKV_GCP_62:access is audited by Cloud Audit Logs (data access); a log bucket would hold only copies
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      age                   = var.checkpoint_nearline_after_days
      matches_storage_class = ["STANDARD"]
    }
    action {
      type          = "SetStorageClass"
      storage_class = "NEARLINE"
    }
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }
}

resource "google_storage_bucket" "mlflow" {
  name                        = "${local.bucket_prefix}-mlflow"
  location                    = var.region
  labels                      = var.labels
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # checkov:skip=CKV_GCP_62:access is audited by Cloud Audit Logs (data access); a log bucket would hold only copies
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }
}
