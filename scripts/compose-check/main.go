// compose-check validates docker-compose.yml against the Compose Specification with compose-go
// (the loader Docker Compose itself uses) for one profile, checks the project's own rules, and can
// print the environment a service gets, for the native compose-wiring run.
//
//	compose-check -profile kraft -version 0.1.0 docker-compose.yml
//	compose-check -profile kraft,monitoring docker-compose.yml
//	compose-check -profile zookeeper -env websocket docker-compose.yml
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
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: compose-check [-profile P] [-env SERVICE] docker-compose.yml")
		os.Exit(2)
	}
	project, err := load(flag.Arg(0), *profile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "compose-check: %s (profile %s): %v\n", flag.Arg(0), *profile, err)
		os.Exit(1)
	}
	if *envOf != "" {
		service, ok := project.Services[*envOf]
		if !ok {
			fmt.Fprintf(os.Stderr, "compose-check: no service %q in profile %s\n", *envOf, *profile)
			os.Exit(1)
		}
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

// rules are the project's own expectations beyond the specification.
func rules(project *types.Project, version string) []string {
	var problems []string
	oneShot := map[string]bool{"kafka-init": true, "migrate": true}
	required := []string{"websocket", "grpc_kafka", "postgres", "redis", "kafka-init", "migrate"}
	for _, name := range required {
		if _, ok := project.Services[name]; !ok {
			problems = append(problems, fmt.Sprintf("service %s is missing", name))
		}
	}
	kafkas := 0
	for name, service := range project.Services {
		for _, alias := range aliases(service) {
			if alias == "kafka" {
				kafkas++
			}
		}
		if !oneShot[name] && (service.HealthCheck == nil || len(service.HealthCheck.Test) == 0) {
			problems = append(problems, fmt.Sprintf("long-running service %s has no health check", name))
		}
		if service.Image == "" {
			problems = append(problems, fmt.Sprintf("service %s has no pinned image", name))
		}
	}
	if kafkas != 1 {
		problems = append(problems, fmt.Sprintf("%d services answer to the name kafka, want exactly 1", kafkas))
	}
	for name, port := range map[string]uint32{"websocket": 8080, "grpc_kafka": 50051} {
		service, ok := project.Services[name]
		if !ok {
			continue
		}
		if want := "purchase-pipeline/" + name + ":" + version; version != "" && service.Image != want {
			problems = append(problems, fmt.Sprintf("%s names image %s, want %s (Cargo.toml's version, the Nix-built tag)", name, service.Image, want))
		}
		if service.PullPolicy != types.PullPolicyNever {
			problems = append(problems, fmt.Sprintf("%s must use the Nix-built image (pull_policy: never)", name))
		}
		published := false
		for _, p := range service.Ports {
			if p.Target == port && p.Published == fmt.Sprint(port) {
				published = true
			}
		}
		if !published {
			problems = append(problems, fmt.Sprintf("%s does not publish port %d", name, port))
		}
	}
	return problems
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
