//! The `ec2` provider: builder VMs on Amazon EC2 through `aws-sdk-ec2`.
//!
//! This module holds what needs no SDK (settings, instance types, error classes); the
//! provider itself ([`Ec2Provider`], in `provider.rs`) is built with the `ec2` feature, on by
//! default. A binary built without it (the local example) refuses an `ec2` provider config.
//!
//! One attempt, one instance: [`Ec2Provider::create_instance`] first looks for an instance
//! already launched for the attempt (tags `stagely:job` and `stagely:attempt`, not
//! terminated) and returns it, so a core that died between the API call and recording the id
//! never starts a second one; the launch itself carries a `ClientToken` derived from the
//! attempt as EC2's own guard. Every launch requires IMDSv2 with a hop limit of 1 (a build
//! container cannot reach the instance metadata, so it cannot read the user-data and its
//! token), terminates on shutdown (the agent powers the machine off when done), and tags the
//! instance and its volumes.
//!
//! Errors are classified from EC2's error codes ([`classify`]): capacity, price and limit
//! errors are worth another attempt; a bad AMI, credentials or configuration are not.
//! Spot launches that meet a capacity or price error fall back to on-demand at once.

use std::collections::BTreeMap;

use crate::{Arch, MachineSize};

#[cfg(feature = "ec2")]
mod provider;
#[cfg(feature = "ec2")]
pub use provider::Ec2Provider;

/// The tag every instance this provider launches carries.
pub const MANAGED_TAG: &str = "stagely:managed";
/// Instance types per machine class and architecture when the configuration names none (the
/// design's AWS table).
pub fn default_instance_type(size: MachineSize, arch: Arch) -> &'static str {
    match (size, arch) {
        (MachineSize::Small, Arch::Amd64) => "t3.small",
        (MachineSize::Medium, Arch::Amd64) => "c5.xlarge",
        (MachineSize::Large, Arch::Amd64) => "c5.2xlarge",
        (MachineSize::Small, Arch::Arm64) => "t4g.small",
        (MachineSize::Medium, Arch::Arm64) => "c6g.xlarge",
        (MachineSize::Large, Arch::Arm64) => "c6g.2xlarge",
    }
}

/// One machine class's overrides (`[provider.ec2.classes.<size>]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassSettings {
    pub amd64: Option<String>,
    pub arm64: Option<String>,
    /// Launch this class on spot (overrides the global `spot`).
    pub spot: Option<bool>,
}

/// What the `ec2` provider launches with (`[provider.ec2]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ec2Settings {
    /// Region; else the SDK's chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    pub ami_amd64: Option<String>,
    pub ami_arm64: Option<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    /// Instance profile name (or ARN) for the builder.
    pub instance_profile: Option<String>,
    /// Launch on spot by default.
    pub spot: bool,
    /// An arm64 job may run on an amd64 instance under QEMU when no arm64 AMI is configured.
    pub allow_emulation: bool,
    pub classes: BTreeMap<MachineSize, ClassSettings>,
    /// The instance metadata service builders poll for spot interruption notices (default
    /// [`IMDS_URL`]; an IMDS emulator's address in tests).
    pub metadata_url: Option<String>,
    /// How long a builder's agent keeps dialling an unreachable core before it powers the
    /// instance off (default: the agent's, ten minutes).
    pub core_unreachable_secs: Option<u64>,
}

/// EC2's instance metadata service, as every instance sees it.
pub const IMDS_URL: &str = "http://169.254.169.254";

impl Ec2Settings {
    /// The instance type for `size` on `arch`.
    pub fn instance_type(&self, size: MachineSize, arch: Arch) -> String {
        let class = self.classes.get(&size);
        let configured = class.and_then(|c| match arch {
            Arch::Amd64 => c.amd64.clone(),
            Arch::Arm64 => c.arm64.clone(),
        });
        configured.unwrap_or_else(|| default_instance_type(size, arch).to_string())
    }

    /// Whether `size` launches on spot.
    pub fn spot_for(&self, size: MachineSize) -> bool {
        self.classes
            .get(&size)
            .and_then(|c| c.spot)
            .unwrap_or(self.spot)
    }

    #[cfg_attr(not(feature = "ec2"), allow(dead_code))]
    fn ami(&self, arch: Arch) -> Option<&str> {
        match arch {
            Arch::Amd64 => self.ami_amd64.as_deref(),
            Arch::Arm64 => self.ami_arm64.as_deref(),
        }
        .filter(|ami| !ami.is_empty())
    }
}

/// How an EC2 error code is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// No capacity (for this type, zone or market) or over a price: another attempt, or the
    /// other market, may succeed.
    Capacity,
    /// An account or request limit, throttling, or EC2 failing: worth another attempt later.
    Transient,
    /// The request can never succeed as configured (bad AMI, credentials, parameters).
    Permanent,
}

/// Classifies an EC2 error code.
pub fn classify(code: &str) -> ErrorClass {
    match code {
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacityOnHost"
        | "SpotMaxPriceTooLow"
        | "MaxSpotInstanceCountExceeded"
        | "UnfulfillableCapacity"
        | "Unsupported" => ErrorClass::Capacity,
        "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "InternalError"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "Unavailable"
        | "RequestExpired" => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified_as_ec2_documents_them() {
        for code in [
            "InsufficientInstanceCapacity",
            "SpotMaxPriceTooLow",
            "MaxSpotInstanceCountExceeded",
        ] {
            assert_eq!(classify(code), ErrorClass::Capacity, "{code}");
        }
        for code in [
            "InstanceLimitExceeded",
            "RequestLimitExceeded",
            "InternalError",
        ] {
            assert_eq!(classify(code), ErrorClass::Transient, "{code}");
        }
        for code in [
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "AuthFailure",
            "UnauthorizedOperation",
            "InvalidSubnetID.NotFound",
            "InvalidParameterValue",
        ] {
            assert_eq!(classify(code), ErrorClass::Permanent, "{code}");
        }
    }

    #[test]
    fn instance_types_come_from_the_table_unless_a_class_names_one() {
        let mut settings = Ec2Settings::default();
        assert_eq!(
            settings.instance_type(MachineSize::Medium, Arch::Arm64),
            "c6g.xlarge"
        );
        settings.classes.insert(
            MachineSize::Medium,
            ClassSettings {
                arm64: Some("c7g.xlarge".into()),
                ..ClassSettings::default()
            },
        );
        assert_eq!(
            settings.instance_type(MachineSize::Medium, Arch::Arm64),
            "c7g.xlarge"
        );
        assert_eq!(
            settings.instance_type(MachineSize::Medium, Arch::Amd64),
            "c5.xlarge"
        );
    }
}
