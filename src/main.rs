fn main() {
    println!("handgrad");
}
