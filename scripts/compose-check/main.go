// compose-check validates docker-compose.yml against the Compose Specification with compose-go
// (the loader Docker Compose itself uses) for one profile, checks the project's own rules, and can
// print the environment a service gets, for the native compose-wiring run.
//
//	compose-check -profile kraft -version 0.1.0 docker-compose.yml
//	compose-check -profile kraft,monitoring docker-compose.yml
//	compose-check -profile zookeeper -env websocket docker-compose.yml
//	compose-check -profile cluster -replicas grpc_kafka-replicas docker-compose.yml
//	compose-check -profile cluster -entrypoint kafka-init-cluster docker-compose.yml
//
// -profile takes a comma-separated list; -version is the workspace's version, the tag the
// Nix-built images carry (nix/images.nix), which the two services' images must name.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
)

func main() {
	profile := flag.String("profile", "kraft", "compose profiles to activate, comma-separated")
	version := flag.String("version", "", "the workspace's version: the tag of the Nix-built images")
	envOf := flag.String("env", "", "print KEY=VALUE lines of this service's environment and exit")
	replicasOf := flag.String("replicas", "", "print how many replicas this service runs and exit")
	entrypointOf := flag.String("entrypoint", "", "print this service's entrypoint, one argument a line, and exit")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: compose-check [-profile P] [-version V] [-env|-replicas|-entrypoint SERVICE] docker-compose.yml")
		os.Exit(2)
	}
	project, err := load(flag.Arg(0), *profile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "compose-check: %s (profile %s): %v\n", flag.Arg(0), *profile, err)
		os.Exit(1)
	}
	service := func(name string) types.ServiceConfig {
		service, ok := project.Services[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "compose-check: no service %q in profile %s\n", name, *profile)
			os.Exit(1)
		}
		return service
	}
	if *replicasOf != "" {
		fmt.Println(replicas(service(*replicasOf)))
		return
	}
	if *entrypointOf != "" {
		for _, arg := range service(*entrypointOf).Entrypoint {
			fmt.Println(arg)
		}
		return
	}
	if *envOf != "" {
		service := service(*envOf)
		keys := make([]string, 0, len(service.Environment))
		for key := range service.Environment {
			keys = append(keys, key)
		}
		sort.Strings(keys)
		for _, key := range keys {
			if value := service.Environment[key]; value != nil {
				fmt.Printf("%s=%s\n", key, *value)
			}
		}
		return
	}
	problems := rules(project, *version)
	for _, problem := range problems {
		fmt.Fprintf(os.Stderr, "compose-check: profile %s: %s\n", *profile, problem)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
	names := make([]string, 0, len(project.Services))
	for name := range project.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	fmt.Printf("compose-check: profile %s valid; services: %v\n", *profile, names)
}

func load(path, profile string) (*types.Project, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	options, err := cli.NewProjectOptions(
		[]string{abs},
		cli.WithWorkingDirectory(filepath.Dir(abs)),
		cli.WithName("purchase-pipeline"),
		cli.WithProfiles(strings.Split(profile, ",")),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		return nil, err
	}
	return options.LoadProject(context.Background())
}

// rules are the project's own expectations beyond the specification, for the active profiles.
func rules(project *types.Project, version string) []string {
	var problems []string
	add := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	for _, name := range []string{"postgres", "migrate"} {
		if _, ok := project.Services[name]; !ok {
			add("service %s is missing", name)
		}
	}
	// One websocket, one grpc_kafka and one topic init per profile (replicated or not): two active
	// would mean two of kraft, zookeeper and cluster at once, each with its own Kafka.
	roles := map[string][]string{}
	for name, service := range project.Services {
		roles[role(name, service)] = append(roles[role(name, service)], name)
	}
	for _, r := range []string{"websocket", "grpc_kafka", "topic init"} {
		if len(roles[r]) != 1 {
			sort.Strings(roles[r])
			add("want exactly one %s service, have %v (activate one of the kraft, zookeeper and cluster profiles)", r, roles[r])
		}
	}
	names := map[string]bool{}
	kafkas := 0
	for name, service := range project.Services {
		names[name] = true
		for _, alias := range aliases(service) {
			names[alias] = true
			if alias == "kafka" {
				kafkas++
			}
		}
	}
	if kafkas > 1 {
		add("%d services answer to the name kafka, want at most 1", kafkas)
	}
	for name, service := range project.Services {
		oneShot := service.Restart == "no"
		if !oneShot && (service.HealthCheck == nil || len(service.HealthCheck.Test) == 0) {
			add("long-running service %s has no health check", name)
		}
		if service.Image == "" {
			add("service %s has no pinned image", name)
		}
		if strings.HasPrefix(service.Image, "purchase-pipeline/") {
			if version != "" && !strings.HasSuffix(service.Image, ":"+version) {
				add("%s names image %s, want the tag %s (Cargo.toml's version, the Nix-built tag)", name, service.Image, version)
			}
			if service.PullPolicy != types.PullPolicyNever {
				add("%s must use the Nix-built image (pull_policy: never)", name)
			}
		}
		// Every broker a service is given is a service (or alias) of the active profiles (migrate's
		// is only there because the binary's settings require it: migrate never reaches Kafka).
		brokers := env(service, "KAFKA_BROKERS")
		if name == "migrate" {
			brokers = ""
		}
		if servers := argAfter(service.Entrypoint, "--bootstrap-server"); servers != "" {
			brokers = servers
		}
		for _, broker := range strings.Split(brokers, ",") {
			host, _, _ := strings.Cut(broker, ":")
			if host != "" && !names[host] {
				add("%s names the broker %s, which no active service answers to", name, broker)
			}
		}
		// Every secret file a setting names is a secret the service mounts.
		mounted := map[string]bool{}
		for _, secret := range service.Secrets {
			mounted[secret.Source] = true
		}
		for key, value := range service.Environment {
			if value != nil && strings.HasSuffix(key, "_FILE") && strings.HasPrefix(*value, "/run/secrets/") {
				if secret := strings.TrimPrefix(*value, "/run/secrets/"); !mounted[secret] {
					add("%s reads %s=%s but does not mount the secret %s", name, key, *value, secret)
				}
			}
		}
	}
	for r, port := range map[string]uint32{"websocket": 8080, "grpc_kafka": 50051} {
		for _, name := range roles[r] {
			service := project.Services[name]
			// A replicated service publishes a range of as many host ports, starting at the port.
			want := fmt.Sprint(port)
			if n := replicas(service); n > 1 {
				want = fmt.Sprintf("%d-%d", port, port+uint32(n)-1)
			}
			published := false
			for _, p := range service.Ports {
				if p.Target == port && p.Published == want {
					published = true
				}
			}
			if !published {
				add("%s does not publish port %d as %s", name, port, want)
			}
		}
	}
	// The websocket relays the stream the grpc_kafka counts, on the topic the init creates.
	if len(roles["websocket"]) == 1 && len(roles["grpc_kafka"]) == 1 && len(roles["topic init"]) == 1 {
		ws, grpc := project.Services[roles["websocket"][0]], project.Services[roles["grpc_kafka"][0]]
		if env(ws, "STREAM_ID") != env(grpc, "STREAM_ID") {
			add("websocket relays STREAM_ID %q and grpc_kafka counts %q", env(ws, "STREAM_ID"), env(grpc, "STREAM_ID"))
		}
		topic := argAfter(project.Services[roles["topic init"][0]].Entrypoint, "--topic")
		if env(ws, "KAFKA_TOPIC") != topic || env(grpc, "KAFKA_TOPIC") != topic {
			add("topics differ: websocket %q, grpc_kafka %q, %s creates %q", env(ws, "KAFKA_TOPIC"), env(grpc, "KAFKA_TOPIC"), roles["topic init"][0], topic)
		}
	}
	return problems
}

// role is what a service is in the pipeline: "websocket", "grpc_kafka", "topic init", or "".
func role(name string, service types.ServiceConfig) string {
	switch {
	case strings.HasPrefix(service.Image, "purchase-pipeline/websocket:") && name != "migrate":
		return "websocket"
	case strings.HasPrefix(service.Image, "purchase-pipeline/grpc_kafka:"):
		return "grpc_kafka"
	}
	for _, arg := range service.Entrypoint {
		if strings.HasSuffix(arg, "kafka-topics.sh") {
			return "topic init"
		}
	}
	return ""
}

// argAfter is the argument that follows flag in args ("" without one).
func argAfter(args []string, flag string) string {
	for i, arg := range args {
		if arg == flag && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

func env(service types.ServiceConfig, key string) string {
	if value := service.Environment[key]; value != nil {
		return *value
	}
	return ""
}

func replicas(service types.ServiceConfig) int {
	if service.Deploy != nil && service.Deploy.Replicas != nil {
		return *service.Deploy.Replicas
	}
	return 1
}

func aliases(service types.ServiceConfig) []string {
	var all []string
	for _, network := range service.Networks {
		if network != nil {
			all = append(all, network.Aliases...)
		}
	}
	return all
}
