# MLflow's backend store: PostgreSQL on a private IP, reached through the Cloud SQL Auth Proxy with the
# MLflow service account's IAM identity (k8s/overlays/gke): there is no database password.
resource "google_sql_database_instance" "mlflow" {
  name                = "${var.name}-mlflow"
  database_version    = "POSTGRES_18"
  region              = var.region
  deletion_protection = var.deletion_protection
  depends_on          = [google_service_networking_connection.private_services]
  # checkov:skip=CKV_GCP_110:pgAudit is for regulated data; this holds experiment metadata, and admin access is in Cloud Audit Logs
  # checkov:skip=CKV2_GCP_13:log_duration logs every statement's time, one line per metric write from training

  settings {
    # PostgreSQL 16+ defaults to Enterprise Plus, which takes only db-perf-optimized tiers.
    edition           = "ENTERPRISE"
    tier              = var.cloudsql_tier
    availability_type = "REGIONAL"
    disk_autoresize   = true
    user_labels       = var.labels
    ip_configuration {
      ipv4_enabled    = false
      private_network = google_compute_network.main.id
      ssl_mode        = "TRUSTED_CLIENT_CERTIFICATE_REQUIRED" # the Auth Proxy presents client certificates
    }
    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
    }
    database_flags {
      name  = "cloudsql.iam_authentication"
      value = "on"
    }
    # Audit-friendly logging (CIS Google Cloud benchmark 6.2.x).
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
  }
}

resource "google_sql_database" "mlflow" {
  name     = "mlflow"
  instance = google_sql_database_instance.mlflow.name
}

# Cloud SQL names an IAM service-account user by its email without ".gserviceaccount.com".
resource "google_sql_user" "mlflow" {
  name     = trimsuffix(google_service_account.mlflow.email, ".gserviceaccount.com")
  instance = google_sql_database_instance.mlflow.name
  type     = "CLOUD_IAM_SERVICE_ACCOUNT"
}
