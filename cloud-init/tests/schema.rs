//! The rendered user-data passes the real validator, `cloud-init schema`.
//! In CI (`CI=true`) a missing `cloud-init` fails the test; elsewhere it is skipped with a note.

use std::process::Command;

use stagely_cloud_init::{AgentConfig, Bootstrap, render_user_data};

/// Whether `program arg` runs. In CI (`CI=true`) a missing tool fails the test; elsewhere
/// the test is skipped with a note.
fn available(program: &str, arg: &str) -> bool {
    let found = Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{program} is not installed; CI needs it (run scripts/setup.sh)"
        );
        eprintln!("skipping: {program} is not installed (run scripts/setup.sh)");
    }
    found
}

fn cloud_init_available() -> bool {
    available("cloud-init", "--version")
}

#[test]
fn rendered_user_data_passes_cloud_init_schema() {
    if !cloud_init_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for ca in [
        None,
        Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
    ] {
        let text = render_user_data(&Bootstrap {
            agent: AgentConfig {
                builder: Some("buildx".into()),
                ..AgentConfig::new("https://core.example.internal", "t0k3n")
            },
            ca_pem: ca.map(str::to_string),
        })
        .unwrap();
        let path = dir.path().join("user-data.yaml");
        std::fs::write(&path, &text).unwrap();
        let out = Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cloud-init schema rejected:\n{text}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_broken_user_data_is_rejected_by_the_validator() {
    // Guards the test above: the validator really rejects bad input here.
    if !cloud_init_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "#cloud-config\nwrite_files:\n  - permissions: 0600\n    content: x\n",
    )
    .unwrap();
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn systemd_analyze_available() -> bool {
    available("systemd-analyze", "--version")
}

/// Applies `user_data`'s files under `root` as cloud-init would, with the targets the unit
/// needs and an executable where its `ExecStart` points, then runs `systemd-analyze verify`.
fn verify_unit(user_data: &str, root: &std::path::Path) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    for file in stagely_cloud_init::written_files(user_data).unwrap() {
        let path = root.join(file.path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &file.content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode())).unwrap();
    }
    let units = root.join("lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".target") || name == "systemd-poweroff.service" {
            let _ = std::fs::copy(entry.path(), units.join(&*name));
        }
    }
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("stagely-agent.service")
        .output()
        .unwrap()
}

#[test]
fn the_agent_unit_passes_systemd_analyze_verify() {
    if !systemd_analyze_available() {
        return;
    }
    let text = render_user_data(&Bootstrap {
        agent: AgentConfig {
            core_unreachable_secs: Some(600),
            ..AgentConfig::new("https://core.example.internal", "t0k3n")
        },
        ca_pem: None,
    })
    .unwrap();
    let unit = stagely_cloud_init::AGENT_UNIT;
    let exec = stagely_cloud_init::unit_exec_start(unit).unwrap();

    // Without the agent binary the verifier must complain (guards the check itself).
    let bare = tempfile::tempdir().unwrap();
    let out = verify_unit(&text, bare.path());
    assert!(
        !out.status.success(),
        "verify passed without {}: {}",
        exec[0],
        String::from_utf8_lossy(&out.stderr)
    );

    // With it (any executable: the unit, not the binary, is under test), clean.
    let root = tempfile::tempdir().unwrap();
    let binary = root.path().join(exec[0].trim_start_matches('/'));
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    std::fs::copy("/bin/true", &binary).unwrap();
    let out = verify_unit(&text, root.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Warnings (an unparsable setting is only ignored) count as failures too.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warned: {stderr}"
    );
}
