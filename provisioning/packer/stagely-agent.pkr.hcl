# Golden image for Stagely builder instances, one AMI per architecture.
#
#   cargo build --release -p stagely-agent --target x86_64-unknown-linux-gnu
#   cargo build --release -p stagely-agent --target aarch64-unknown-linux-gnu
#   cp target/x86_64-unknown-linux-gnu/release/stagely-agent  dist/stagely-agent-amd64
#   cp target/aarch64-unknown-linux-gnu/release/stagely-agent dist/stagely-agent-arm64
#   packer init provisioning/packer && packer build provisioning/packer
#
# Then set `[provider.ec2] ami_amd64` / `ami_arm64` in stagely.toml to the two AMI ids Packer
# prints. See README.md, "Building the builder AMIs".

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region the AMIs are built in (copy them elsewhere with aws ec2 copy-image)."
}

variable "agent_dir" {
  type        = string
  default     = "dist"
  description = "Directory holding stagely-agent-amd64 and stagely-agent-arm64."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the temporary build instance (default VPC when empty)."
}

variable "image_version" {
  type        = string
  default     = "dev"
  description = "Stagely version baked in; part of the AMI name and a tag."
}

variable "debian_owner" {
  type        = string
  default     = "136693071363"
  description = "Account publishing the official Debian AMIs."
}

locals {
  stamp = formatdate("YYYYMMDD-hhmmss", timestamp())
}

source "amazon-ebs" "amd64" {
  region        = var.region
  instance_type = "c6i.large"
  subnet_id     = var.subnet_id
  ssh_username  = "admin"
  ami_name      = "stagely-builder-amd64-${var.image_version}-${local.stamp}"
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [var.debian_owner]
    most_recent = true
  }
  # Builder instances get IMDSv2-only metadata from the core's RunInstances call, not from
  # the AMI (Packer 1.6's builder has no metadata_options; newer ones may add them).
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 30
    volume_type           = "gp3"
    throughput            = 250
    iops                  = 3000
    delete_on_termination = true
  }
  tags = {
    "stagely:image"   = "builder"
    "stagely:version" = var.image_version
    "stagely:arch"    = "amd64"
  }
}

source "amazon-ebs" "arm64" {
  region        = var.region
  instance_type = "c6g.large"
  subnet_id     = var.subnet_id
  ssh_username  = "admin"
  ami_name      = "stagely-builder-arm64-${var.image_version}-${local.stamp}"
  source_ami_filter {
    filters = {
      name                = "debian-12-arm64-*"
      architecture        = "arm64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [var.debian_owner]
    most_recent = true
  }
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 30
    volume_type           = "gp3"
    throughput            = 250
    iops                  = 3000
    delete_on_termination = true
  }
  tags = {
    "stagely:image"   = "builder"
    "stagely:version" = var.image_version
    "stagely:arch"    = "arm64"
  }
}

build {
  sources = ["source.amazon-ebs.amd64", "source.amazon-ebs.arm64"]

  provisioner "file" {
    source      = "${var.agent_dir}/stagely-agent-${source.name}"
    destination = "/tmp/stagely-agent"
  }

  provisioner "file" {
    source      = "${path.root}/../../cloud-init/templates/stagely-agent.service"
    destination = "/tmp/stagely-agent.service"
  }

  provisioner "shell" {
    script          = "${path.root}/provision.sh"
    execute_command = "sudo -E bash '{{ .Path }}'"
  }
}
