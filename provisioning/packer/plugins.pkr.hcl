# Packer >= 1.7 installs the Amazon plugin from this block (`packer init .`). Kept in its own
# file: Packer 1.6 (Debian's, which CI validates with) predates `required_plugins` and has the
# amazon builder built in, so the tests validate `stagely-agent.pkr.hcl` by name.
packer {
  required_plugins {
    amazon = {
      version = ">= 1.2.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}
