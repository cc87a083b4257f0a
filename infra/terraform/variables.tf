variable "project_id" {
  type        = string
  description = "Google Cloud project that holds the cluster, buckets, registry and database."
}

variable "region" {
  type        = string
  description = "Region of the regional GKE cluster, its subnet, the buckets, the registry and Cloud SQL."
  default     = "us-central1"
}

variable "gpu_zones" {
  type        = list(string)
  description = "Zones of var.region that offer var.gpu_type; the GPU pools place nodes only there."
  default     = ["us-central1-a", "us-central1-b", "us-central1-c"]
}

variable "name" {
  type        = string
  description = "Prefix of every resource name (cluster, service accounts, buckets after the project id)."
  default     = "maeclip"
}

variable "labels" {
  type        = map(string)
  description = "Labels put on every resource that takes them."
  default     = { app = "maeclip" }
}

variable "deletion_protection" {
  type        = bool
  description = "Refuse to destroy the cluster and the Cloud SQL instance (set false only to tear down)."
  default     = true
}

variable "subnet_cidr" {
  type        = string
  description = "Primary range of the cluster subnet (nodes)."
  default     = "10.10.0.0/20"
}

variable "pods_cidr" {
  type        = string
  description = "Secondary range for pod IPs."
  default     = "10.16.0.0/14"
}

variable "services_cidr" {
  type        = string
  description = "Secondary range for Service IPs."
  default     = "10.20.0.0/20"
}

variable "master_cidr" {
  type        = string
  description = "The /28 that the private control plane uses."
  default     = "172.16.0.0/28"
}

variable "master_authorized_networks" {
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
  description = "Networks allowed to reach the control plane's public endpoint (your office or CI egress)."
}

variable "system_machine_type" {
  type        = string
  description = "Machine type of the system pool (MLflow, Kubeflow Pipelines, Volcano)."
  default     = "e2-standard-4"
}

variable "system_max_nodes" {
  type        = number
  description = "Most nodes of the system pool, across all zones."
  default     = 6
}

variable "gpu_machine_type" {
  type        = string
  description = "Machine type of the GPU pools; it must accept var.gpus_per_node of var.gpu_type."
  default     = "g2-standard-16"
}

variable "gpu_type" {
  type        = string
  description = "Accelerator type of the GPU pools."
  default     = "nvidia-l4"
}

variable "gpus_per_node" {
  type        = number
  description = "GPUs per node of the GPU pools."
  default     = 1
}

variable "gpu_disk_size_gb" {
  type        = number
  description = "Boot disk of a GPU node: the image (CUDA torch) and the Streaming shard cache live there."
  default     = 200
}

variable "gpu_ondemand_max_nodes" {
  type        = number
  description = "Most on-demand GPU nodes, across all zones (train_eval runs)."
  default     = 4
}

variable "gpu_spot_max_nodes" {
  type        = number
  description = "Most spot GPU nodes, across all zones (preemptible study runs)."
  default     = 8
}

variable "checkpoint_nearline_after_days" {
  type        = number
  description = "Age after which checkpoint objects move to Nearline storage."
  default     = 30
}

variable "noncurrent_retention_days" {
  type        = number
  description = "Days an overwritten or deleted object version is kept before it is removed."
  default     = 7
}

variable "untagged_image_retention_days" {
  type        = number
  description = "Days an untagged image stays in Artifact Registry before cleanup deletes it."
  default     = 14
}

variable "cloudsql_tier" {
  type        = string
  description = "Machine tier of the Cloud SQL (PostgreSQL) instance behind MLflow."
  default     = "db-custom-2-7680"
}

variable "k8s_namespace" {
  type        = string
  description = "Namespace of the maeclip workloads (k8s/base/namespace.yaml)."
  default     = "maeclip"
}

variable "trainer_ksa" {
  type        = string
  description = "Kubernetes service account of training pods (k8s/base/serviceaccounts.yaml)."
  default     = "maeclip-trainer"
}

variable "mlflow_ksa" {
  type        = string
  description = "Kubernetes service account of the MLflow server (k8s/base/serviceaccounts.yaml)."
  default     = "maeclip-mlflow"
}

variable "kfp_namespace" {
  type        = string
  description = "Namespace of Kubeflow Pipelines, where pipeline steps run."
  default     = "kubeflow"
}

variable "kfp_ksa" {
  type        = string
  description = "Kubernetes service account that Kubeflow Pipelines runs pipeline steps as."
  default     = "pipeline-runner"
}
