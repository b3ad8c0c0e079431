# jobmesh executor: the node agent, one per Nomad client (a system job). Runs bound jobs,
# heartbeats its node record, reports lifecycle events and log lines.
# nomad job run deploy/nomad/executor.nomad.hcl    (deploy/nomad/README.md: variables, image)

variable "image" {
  type        = string
  default     = "jobmesh:local"
  description = "The jobmesh image built from deploy/Dockerfile, pushed where every client can pull it."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "otlp_endpoint" {
  type        = string
  default     = ""
  description = "OTLP/HTTP endpoint for traces, e.g. http://tempo.service.consul:4318; empty turns export off."
}

# What each node advertises to the scheduler and binder. Keep these equal to the task's
# resources below, so jobs are placed against what the container may really use.
variable "executor_cpu_mhz" {
  type    = number
  default = 2000
}

variable "executor_cpu_milli" {
  type        = number
  default     = 2000
  description = "CPU the node offers to jobs, in millicores (1000 = one core)."
}

variable "executor_memory_mb" {
  type    = number
  default = 2048
}

job "jobmesh-executor" {
  datacenters = var.datacenters
  type        = "system"

  # One node at a time, so most of the fleet keeps running jobs during an upgrade.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "executor" {
    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    task "executor" {
      driver = "docker"

      config {
        image   = var.image
        command = "jobmesh-executor"
      }

      # SIGTERM starts the graceful drain: no new batches, in-flight ones finish within
      # JOBMESH_DRAIN_SECONDS (10 s), then the NATS connection drains (up to 5 s).
      # kill_timeout is how long Nomad waits before SIGKILL, so it must cover both.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      # Connection settings come from the Nomad variable at nomad/jobs, which every job in
      # the namespace may read (see README.md). The task waits until the variable exists.
      template {
        destination = "secrets/jobmesh.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs" }}
          JOBMESH_NATS_URL={{ .nats_url }}
          {{ end }}
        EOT
      }

      env {
        JOBMESH_DRAIN_SECONDS       = "10"
        JOBMESH_LOG_LEVEL           = "INFO"
        OTEL_EXPORTER_OTLP_ENDPOINT = var.otlp_endpoint
        OTEL_TRACES_EXPORTER        = var.otlp_endpoint == "" ? "none" : "otlp"
        # A stable node id across restarts, so this node's dispatch consumer
        # (executor-<node_id>) and its reservations survive a task restart.
        JOBMESH_NODE_ID        = "${node.unique.id}"
        JOBMESH_NODE_ZONE      = "${node.datacenter}"
        JOBMESH_NODE_CPU_MILLI = "${var.executor_cpu_milli}"
        JOBMESH_NODE_MEMORY_MB = "${var.executor_memory_mb}"
      }

      # `jobmesh health executor` asks the service over NATS and exits 0 when it answers ok.
      # Script checks run inside the task and need the Consul service provider.
      service {
        name     = "jobmesh-executor"
        provider = "consul"
        tags     = ["jobmesh"]

        check {
          name     = "jobmesh health executor"
          type     = "script"
          command  = "/usr/local/bin/jobmesh"
          args     = ["health", "executor"]
          interval = "15s"
          timeout  = "10s"

          check_restart {
            limit = 3
            grace = "30s"
          }
        }
      }

      resources {
        cpu    = var.executor_cpu_mhz
        memory = var.executor_memory_mb
      }
    }
  }
}
