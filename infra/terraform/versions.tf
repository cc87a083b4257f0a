terraform {
  required_version = ">= 1.6"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
  # State in a GCS bucket given at init: terraform init -backend-config="bucket=STATE_BUCKET" (infra/README.md).
  backend "gcs" {
    prefix = "maeclip"
  }
}

# Credentials come from Application Default Credentials (gcloud auth application-default login, or the
# CI's workload identity); none are written here.
provider "google" {
  project = var.project_id
  region  = var.region
}
