locals {
  # The broad scope is Google's recommendation: the node service account's IAM roles are what limit it.
  node_oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
  # GPU nodes are tainted so only pods that ask for a GPU land there (GKE adds the matching toleration to
  # pods that request nvidia.com/gpu).
  gpu_taint = { key = "nvidia.com/gpu", value = "present", effect = "NO_SCHEDULE" }
}

resource "google_container_cluster" "main" {
  name       = var.name
  location   = var.region # regional: control plane and system pool span the region's zones
  network    = google_compute_network.main.id
  subnetwork = google_compute_subnetwork.main.id

  # Node pools are managed below; GKE insists on creating a default pool first.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = var.deletion_protection
  resource_labels          = var.labels
  # checkov:skip=CKV_GCP_12:Dataplane V2 (datapath_provider below) enforces NetworkPolicy; the network_policy block selects Calico, which it replaces
  # checkov:skip=CKV_GCP_65:Google Groups for RBAC needs a Workspace domain; access is granted through IAM roles

  release_channel {
    channel = "REGULAR"
  }
  # GKE Dataplane V2 enforces the NetworkPolicies in k8s/.
  datapath_provider = "ADVANCED_DATAPATH"
  networking_mode   = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }
  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.master_cidr
  }
  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }
  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }
  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }
  enable_shielded_nodes       = true
  enable_intranode_visibility = true
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }
  # Scale idle GPU nodes down quickly: they are the cost.
  cluster_autoscaling {
    autoscaling_profile = "OPTIMIZE_UTILIZATION"
  }
  # Settings of the short-lived default pool, so that it too is hardened.
  node_config {
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# System pool: everything without a GPU (MLflow, Kubeflow Pipelines, Volcano). No taint.
resource "google_container_node_pool" "system" {
  name     = "system"
  cluster  = google_container_cluster.main.id
  location = var.region
  autoscaling {
    total_min_node_count = 1
    total_max_node_count = var.system_max_nodes
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = var.system_machine_type
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = merge(var.labels, { "maeclip.io/pool" = "system" })
    metadata        = { disable-legacy-endpoints = "true" }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# On-demand GPUs for train_eval runs: zero nodes until a job asks for a GPU.
resource "google_container_node_pool" "gpu_ondemand" {
  name           = "gpu-ondemand"
  cluster        = google_container_cluster.main.id
  location       = var.region
  node_locations = var.gpu_zones
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.gpu_ondemand_max_nodes
    location_policy      = "BALANCED"
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = var.gpu_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = var.gpu_disk_size_gb
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = merge(var.labels, { "maeclip.io/pool" = "gpu-ondemand" })
    metadata        = { disable-legacy-endpoints = "true" }
    guest_accelerator {
      type  = var.gpu_type
      count = var.gpus_per_node
      gpu_driver_installation_config {
        gpu_driver_version = "DEFAULT"
      }
    }
    taint {
      key    = local.gpu_taint.key
      value  = local.gpu_taint.value
      effect = local.gpu_taint.effect
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# Spot GPUs for study runs, which are preemptible and resume from their last checkpoint. The extra taint is
# the one GKE documents for spot pools: only pods that tolerate preemption are placed here.
resource "google_container_node_pool" "gpu_spot" {
  name           = "gpu-spot"
  cluster        = google_container_cluster.main.id
  location       = var.region
  node_locations = var.gpu_zones
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.gpu_spot_max_nodes
    location_policy      = "ANY" # take spot capacity in whichever zone has it
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    spot            = true
    machine_type    = var.gpu_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = var.gpu_disk_size_gb
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = merge(var.labels, { "maeclip.io/pool" = "gpu-spot" })
    metadata        = { disable-legacy-endpoints = "true" }
    guest_accelerator {
      type  = var.gpu_type
      count = var.gpus_per_node
      gpu_driver_installation_config {
        gpu_driver_version = "DEFAULT"
      }
    }
    taint {
      key    = local.gpu_taint.key
      value  = local.gpu_taint.value
      effect = local.gpu_taint.effect
    }
    taint {
      key    = "cloud.google.com/gke-spot"
      value  = "true"
      effect = "NO_SCHEDULE"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}
