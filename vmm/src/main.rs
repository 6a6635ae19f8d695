fn main() {
    println!("zygote");
}
