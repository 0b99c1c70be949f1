//! The golden-image template is valid for Packer (`packer validate`, offline), and names the
//! files it uploads: the agent binary per architecture, the unit the user-data starts, and
//! the provisioning script. In CI (`CI=true`) a missing `packer` fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

fn packer_available() -> bool {
    let found = Command::new("packer")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "packer is not installed; CI needs it (run scripts/setup.sh)"
        );
        eprintln!("skipping: packer is not installed (run scripts/setup.sh)");
    }
    found
}

fn template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packer/stagely-agent.pkr.hcl")
}

fn validate(agent_dir: &Path) -> std::process::Output {
    Command::new("packer")
        .arg("validate")
        .arg(format!("-var=agent_dir={}", agent_dir.display()))
        .arg(template())
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .unwrap()
}

#[test]
fn the_golden_image_template_validates() {
    if !packer_available() {
        return;
    }
    let dist = tempfile::tempdir().unwrap();
    // Without the agent binaries Packer must refuse (guards the check below).
    let out = validate(dist.path());
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "validated without binaries: {shown}");
    assert!(shown.contains("stagely-agent-amd64"), "{shown}");

    for arch in ["amd64", "arm64"] {
        std::fs::write(dist.path().join(format!("stagely-agent-{arch}")), b"").unwrap();
    }
    let out = validate(dist.path());
    assert!(
        out.status.success(),
        "packer validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_image_installs_the_unit_the_user_data_starts() {
    let text = std::fs::read_to_string(template()).unwrap();
    assert!(
        text.contains("cloud-init/templates/stagely-agent.service"),
        "the image must bake the same unit the user-data writes"
    );
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packer/provision.sh"))
            .unwrap();
    for needle in [
        "/usr/local/bin/stagely-agent",
        "/etc/systemd/system/stagely-agent.service",
        "docker-buildx-plugin",
        "cloud-init clean",
    ] {
        assert!(script.contains(needle), "provision.sh lacks {needle}");
    }
}
