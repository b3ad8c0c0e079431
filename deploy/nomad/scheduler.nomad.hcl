# jobmesh scheduler: the backlog and its order; releases JobReady with ranked candidate
# nodes. Keeps its backlog in Postgres (JOBMESH_DATABASE_URL).
# nomad job run deploy/nomad/scheduler.nomad.hcl    (deploy/nomad/README.md: variables, image)

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

job "jobmesh-scheduler" {
  datacenters = var.datacenters
  type        = "service"

  update {
    max_parallel     = 1
    min_healthy_time = "10s"
    healthy_deadline = "3m"
    auto_revert      = true
  }

  group "scheduler" {
    # Each partition has one active owner, chosen by lease in KV jm_leases; the second
    # allocation owns the rest or stands by, and takes over within the lease TTL.
    count = 2

    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    task "scheduler" {
      driver = "docker"

      config {
        image   = var.image
        command = "jobmesh-scheduler"
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
          JOBMESH_DATABASE_URL={{ .database_url }}
          {{ end }}
        EOT
      }

      env {
        JOBMESH_DRAIN_SECONDS       = "10"
        JOBMESH_LOG_LEVEL           = "INFO"
        OTEL_EXPORTER_OTLP_ENDPOINT = var.otlp_endpoint
        OTEL_TRACES_EXPORTER        = var.otlp_endpoint == "" ? "none" : "otlp"
      }

      # `jobmesh health scheduler` asks the service over NATS and exits 0 when it answers ok.
      # Script checks run inside the task and need the Consul service provider.
      service {
        name     = "jobmesh-scheduler"
        provider = "consul"
        tags     = ["jobmesh"]

        check {
          name     = "jobmesh health scheduler"
          type     = "script"
          command  = "/usr/local/bin/jobmesh"
          args     = ["health", "scheduler"]
          interval = "15s"
          timeout  = "10s"

          check_restart {
            limit = 3
            grace = "30s"
          }
        }
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
