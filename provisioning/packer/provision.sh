#!/usr/bin/env bash
# Provisions a Stagely builder image (run by Packer as root on a Debian 12 instance).
# Installs: Docker Engine with buildx (the agent's production builder), git, QEMU user
# emulation (the design's arm64-on-amd64 fallback), the stagely-agent binary and its unit.
# The unit is installed but not enabled: each instance's user-data writes its config and
# starts it, so an instance booted without Stagely's user-data does nothing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
apt-get install -y -qq --no-install-recommends ca-certificates curl gnupg git \
    qemu-user-static binfmt-support

# Docker Engine and the buildx plugin, from Docker's own repository (signed).
install -m 0755 -d /etc/apt/keyrings
curl -fsSL https://download.docker.com/linux/debian/gpg -o /etc/apt/keyrings/docker.asc
chmod a+r /etc/apt/keyrings/docker.asc
arch=$(dpkg --print-architecture)
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
echo "deb [arch=$arch signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian $codename stable" \
    > /etc/apt/sources.list.d/docker.list
apt-get update -qq
apt-get install -y -qq --no-install-recommends docker-ce docker-ce-cli containerd.io \
    docker-buildx-plugin
systemctl enable docker.service containerd.service
docker buildx version

# The agent and its unit (uploaded by Packer's file provisioners).
install -m 0755 -o root -g root /tmp/stagely-agent /usr/local/bin/stagely-agent
install -m 0644 -o root -g root /tmp/stagely-agent.service /etc/systemd/system/stagely-agent.service
rm -f /tmp/stagely-agent /tmp/stagely-agent.service
/usr/local/bin/stagely-agent --version
install -d -m 0700 -o root -g root /etc/stagely /var/lib/stagely
systemctl daemon-reload
systemd-analyze verify /etc/systemd/system/stagely-agent.service

# Nothing of this build instance may leak into the image: no SSH host keys, no
# cloud-init state (each instance must run its own user-data), no logs, no history.
apt-get clean
rm -rf /var/lib/apt/lists/* /tmp/* /var/tmp/*
rm -f /etc/ssh/ssh_host_*
cloud-init clean --logs --seed
truncate -s 0 /etc/machine-id
find /var/log -type f -exec truncate -s 0 {} +
rm -f /root/.bash_history /home/*/.bash_history
