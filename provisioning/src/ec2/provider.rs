//! [`Ec2Provider`]: the `ec2` provider through `aws-sdk-ec2` (the `ec2` feature).

use std::collections::BTreeMap;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceInterruptionBehavior,
    InstanceMarketOptionsRequest, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, MarketType, ResourceType, ShutdownBehavior, SpotInstanceType,
    SpotMarketOptions, Tag, TagSpecification,
};
use base64::Engine as _;

use super::{Ec2Settings, ErrorClass, IMDS_URL, MANAGED_TAG, classify};
use crate::{Arch, Instance, InstanceState, MachineSpec, Market, Provider, ProviderError};

/// The provider.
pub struct Ec2Provider {
    client: Client,
    settings: Ec2Settings,
    /// AMIs found to exist with the configured architecture (checked once each).
    verified: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Ec2Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Provider")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Ec2Provider {
    /// A provider with the SDK's standard credential chain and environment (`AWS_REGION`,
    /// `AWS_ENDPOINT_URL_EC2`, profiles, instance roles); `settings.region` wins over the
    /// environment's region.
    pub async fn from_env(settings: Ec2Settings) -> Ec2Provider {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let config = loader.load().await;
        Ec2Provider::with_client(Client::new(&config), settings)
    }

    /// A provider on a configured client.
    pub fn with_client(client: Client, settings: Ec2Settings) -> Ec2Provider {
        Ec2Provider {
            client,
            settings,
            verified: Default::default(),
        }
    }

    /// Checks once that `ami` exists and is built for `arch`: a missing AMI or one of the
    /// other architecture fails the job at once with EC2's answer, instead of booting a
    /// machine that cannot run the agent.
    async fn verify_ami(&self, ami: &str, arch: Arch) -> Result<(), ProviderError> {
        if self
            .verified
            .lock()
            .is_ok_and(|verified| verified.contains(ami))
        {
            return Ok(());
        }
        let images = self
            .client
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .map_err(|error| api_error("DescribeImages", &error))?;
        let Some(image) = images.images().first() else {
            return Err(ProviderError::Api {
                operation: "DescribeImages",
                code: "InvalidAMIID.NotFound".into(),
                message: format!("the image id '{ami}' does not exist"),
                class: ErrorClass::Permanent,
            });
        };
        let built_for = match image.architecture().map(|a| a.as_str()) {
            Some("arm64") => Arch::Arm64,
            Some("x86_64") => Arch::Amd64,
            other => {
                return Err(ProviderError::Config(format!(
                    "AMI {ami} is for architecture {}, which builders cannot use",
                    other.unwrap_or("(none)")
                )));
            }
        };
        if built_for != arch {
            return Err(ProviderError::Config(format!(
                "AMI {ami} is a {built_for} image but is configured as ami_{arch}"
            )));
        }
        if let Ok(mut verified) = self.verified.lock() {
            verified.insert(ami.to_string());
        }
        Ok(())
    }

    pub fn settings(&self) -> &Ec2Settings {
        &self.settings
    }

    /// The architecture and AMI to launch `spec` on: its own, or amd64 under QEMU when no
    /// arm64 AMI is configured and emulation is allowed.
    fn placement(&self, spec: &MachineSpec) -> Result<(Arch, String, bool), ProviderError> {
        if let Some(ami) = self.settings.ami(spec.arch) {
            return Ok((spec.arch, ami.to_string(), false));
        }
        match (spec.arch, self.settings.ami(Arch::Amd64)) {
            (Arch::Arm64, Some(ami)) if self.settings.allow_emulation => {
                Ok((Arch::Amd64, ami.to_string(), true))
            }
            (Arch::Arm64, Some(_)) => Err(ProviderError::UnsupportedArch {
                requested: spec.arch,
                reason: "no arm64 AMI is configured ([provider.ec2] ami_arm64) and emulation on amd64 is not allowed (allow_emulation = false)".into(),
            }),
            _ => Err(ProviderError::Config(format!(
                "no AMI is configured for {} ([provider.ec2] ami_{})",
                spec.arch, spec.arch
            ))),
        }
    }

    /// An instance already launched for the attempt `spec` describes (pending or running).
    async fn launched_for(&self, spec: &MachineSpec) -> Result<Option<Instance>, ProviderError> {
        let (Some(job), Some(attempt)) = (
            spec.tags.get("stagely:job"),
            spec.tags.get("stagely:attempt"),
        ) else {
            return Ok(None);
        };
        let tags = BTreeMap::from([
            ("stagely:job".to_string(), job.clone()),
            ("stagely:attempt".to_string(), attempt.clone()),
        ]);
        Ok(self.describe(&tags).await?.into_iter().next())
    }

    /// Live (pending or running) instances carrying every tag in `tags`.
    async fn describe(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, ProviderError> {
        let mut filters: Vec<Filter> = tags
            .iter()
            .map(|(key, value)| {
                Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value.clone())
                    .build()
            })
            .collect();
        filters.push(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        );
        let mut found = Vec::new();
        let mut pages = self
            .client
            .describe_instances()
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| api_error("DescribeInstances", &error))?;
            for reservation in page.reservations() {
                for instance in reservation.instances() {
                    if let Some(instance) = to_instance(instance) {
                        found.push(instance);
                    }
                }
            }
        }
        Ok(found)
    }

    /// One RunInstances call on `market`.
    async fn launch(
        &self,
        spec: &MachineSpec,
        arch: Arch,
        ami: &str,
        market: Market,
    ) -> Result<Instance, ProviderError> {
        let instance_type = self.settings.instance_type(spec.size, arch);
        let mut tags: Vec<Tag> = spec
            .tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect();
        tags.push(Tag::builder().key(MANAGED_TAG).value("true").build());
        let name = match (
            spec.tags.get("stagely:job"),
            spec.tags.get("stagely:attempt"),
        ) {
            (Some(job), Some(attempt)) => format!("stagely-builder {job} #{attempt}"),
            _ => "stagely-builder".to_string(),
        };
        tags.push(Tag::builder().key("Name").value(name).build());
        let tagged = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(tags.clone()))
                .build()
        };
        let mut request = self
            .client
            .run_instances()
            .image_id(ami)
            .instance_type(InstanceType::from(instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
            .tag_specifications(tagged(ResourceType::Instance))
            .tag_specifications(tagged(ResourceType::Volume))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .set_security_group_ids(
                (!self.settings.security_group_ids.is_empty())
                    .then(|| self.settings.security_group_ids.clone()),
            )
            .set_subnet_id(self.settings.subnet_id.clone());
        if let Some(token) = client_token(spec, market) {
            request = request.client_token(token);
        }
        if let Some(profile) = &self.settings.instance_profile {
            let profile = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(profile)
            } else {
                IamInstanceProfileSpecification::builder().name(profile)
            };
            request = request.iam_instance_profile(profile.build());
        }
        if market == Market::Spot {
            request = request.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        // A spot capacity or price error falls back to on-demand at once: the SDK's own
        // retries of it (it answers 500) would only delay that. On-demand keeps them
        // (the ClientToken makes a retried launch start one instance).
        let retries = match market {
            Market::Spot => aws_sdk_ec2::config::retry::RetryConfig::disabled(),
            Market::OnDemand => aws_sdk_ec2::config::retry::RetryConfig::standard(),
        };
        let output = request
            .customize()
            .config_override(aws_sdk_ec2::config::Builder::default().retry_config(retries))
            .send()
            .await
            .map_err(|error| api_error("RunInstances", &error))?;
        let launched = output
            .instances()
            .first()
            .and_then(to_instance)
            .ok_or_else(|| ProviderError::Api {
                operation: "RunInstances",
                code: "NoInstance".into(),
                message: "the answer named no instance".into(),
                class: ErrorClass::Transient,
            })?;
        Ok(Instance {
            instance_type,
            market: Some(market),
            ..launched
        })
    }
}

/// The attempt's idempotency token: the same attempt on the same market never launches two
/// instances at EC2 (at most 64 ASCII characters).
fn client_token(spec: &MachineSpec, market: Market) -> Option<String> {
    let job = spec.tags.get("stagely:job")?;
    let attempt = spec.tags.get("stagely:attempt")?;
    let market = match market {
        Market::Spot => "s",
        Market::OnDemand => "o",
    };
    let token: String = format!("stagely-{job}-{attempt}-{market}")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    Some(token.chars().take(64).collect())
}

fn to_instance(instance: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let id = instance.instance_id()?.to_string();
    let host_arch = match instance.architecture().map(|a| a.as_str()) {
        Some("arm64") => Arch::Arm64,
        _ => Arch::Amd64,
    };
    let tags: BTreeMap<String, String> = instance
        .tags()
        .iter()
        .filter_map(|tag| Some((tag.key()?.to_string(), tag.value()?.to_string())))
        .collect();
    let market = match instance.instance_lifecycle().map(|l| l.as_str()) {
        Some("spot") => Market::Spot,
        _ => Market::OnDemand,
    };
    let state = instance.state().and_then(|s| s.name());
    if matches!(
        state,
        Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
    ) {
        return None;
    }
    Some(Instance {
        id,
        instance_type: instance
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        host_arch,
        emulated: false,
        tags,
        market: Some(market),
        notice: None,
    })
}

/// A typed error from an SDK error: EC2's code and message (never the request, which holds
/// the user-data), classified.
fn api_error<E, R>(
    operation: &'static str,
    error: &aws_sdk_ec2::error::SdkError<E, R>,
) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match error.code() {
        Some(code) => ProviderError::Api {
            operation,
            code: code.to_string(),
            message: error.message().unwrap_or("").to_string(),
            class: classify(code),
        },
        // No answer (timeout, connection): EC2 may have acted; worth another attempt.
        None => ProviderError::Api {
            operation,
            code: "NoResponse".into(),
            message: aws_sdk_ec2::error::DisplayErrorContext(error).to_string(),
            class: ErrorClass::Transient,
        },
    }
}

#[async_trait::async_trait]
impl Provider for Ec2Provider {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn agent_hints(&self) -> crate::AgentHints {
        crate::AgentHints {
            metadata_url: Some(
                self.settings
                    .metadata_url
                    .clone()
                    .unwrap_or_else(|| IMDS_URL.to_string()),
            ),
            core_unreachable_secs: self.settings.core_unreachable_secs,
        }
    }

    async fn create_instance(&self, spec: &MachineSpec) -> Result<Instance, ProviderError> {
        let (arch, ami, emulated) = self.placement(spec)?;
        self.verify_ami(&ami, arch).await?;
        if let Some(existing) = self.launched_for(spec).await? {
            tracing::info!(instance_id = %existing.id, "the attempt's instance was already launched; using it");
            return Ok(Instance {
                emulated,
                ..existing
            });
        }
        let mut notice = emulated.then(|| {
            format!(
                "no arm64 AMI is configured: this {} job runs on an amd64 instance under QEMU emulation (slower)",
                spec.arch
            )
        });
        let spot = self.settings.spot_for(spec.size) && !spec.on_demand_only;
        let instance = if spot {
            match self.launch(spec, arch, &ami, Market::Spot).await {
                Ok(instance) => instance,
                Err(ProviderError::Api {
                    code,
                    class: ErrorClass::Capacity,
                    ..
                }) => {
                    let line =
                        format!("spot capacity unavailable ({code}): launched on-demand instead");
                    notice = Some(match notice {
                        Some(earlier) => format!("{earlier}; {line}"),
                        None => line,
                    });
                    self.launch(spec, arch, &ami, Market::OnDemand).await?
                }
                Err(error) => return Err(error),
            }
        } else {
            self.launch(spec, arch, &ami, Market::OnDemand).await?
        };
        Ok(Instance {
            emulated,
            notice,
            ..instance
        })
    }

    async fn terminate_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        match self
            .client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: terminating is idempotent.
            Err(error) if error.code() == Some("InvalidInstanceID.NotFound") => Ok(()),
            Err(error) => Err(api_error("TerminateInstances", &error)),
        }
    }

    async fn instance_state(&self, instance_id: &str) -> Result<InstanceState, ProviderError> {
        let answer = match self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(answer) => answer,
            Err(error) if error.code() == Some("InvalidInstanceID.NotFound") => {
                return Ok(InstanceState::Gone {
                    detail: "EC2 does not know the instance (InvalidInstanceID.NotFound)".into(),
                });
            }
            Err(error) => return Err(api_error("DescribeInstances", &error)),
        };
        let state = answer
            .reservations()
            .iter()
            .flat_map(|reservation| reservation.instances())
            .find(|instance| instance.instance_id() == Some(instance_id))
            .and_then(|instance| instance.state())
            .and_then(|state| state.name().cloned());
        Ok(match state {
            Some(InstanceStateName::Pending | InstanceStateName::Running) => InstanceState::Running,
            Some(other) => InstanceState::Gone {
                detail: format!("EC2 instance state {}", other.as_str()),
            },
            None => InstanceState::Gone {
                detail: "EC2 does not list the instance".into(),
            },
        })
    }

    async fn list_instances(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, ProviderError> {
        let mut tags = tags.clone();
        tags.insert(MANAGED_TAG.to_string(), "true".to_string());
        self.describe(&tags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineSize;

    #[test]
    fn client_tokens_are_per_attempt_and_market_and_fit_ec2s_limit() {
        let spec = |attempt: &str| MachineSpec {
            size: MachineSize::Small,
            arch: Arch::Amd64,
            user_data: String::new(),
            tags: BTreeMap::from([
                (
                    "stagely:job".to_string(),
                    "0b6c3f4e-6d1f-4c8e-9a55-2f9a1a2b3c4d".to_string(),
                ),
                ("stagely:attempt".to_string(), attempt.to_string()),
            ]),
            on_demand_only: false,
        };
        let a = client_token(&spec("1"), Market::Spot).unwrap();
        let b = client_token(&spec("1"), Market::OnDemand).unwrap();
        let c = client_token(&spec("2"), Market::Spot).unwrap();
        assert!(a != b && a != c);
        assert!([&a, &b, &c].iter().all(|t| t.len() <= 64 && t.is_ascii()));
    }
}
